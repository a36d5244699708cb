from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from client.early_warning.report import ReportResult, score_and_report
from client.early_warning.scoring import calibrate_model_dir
from client.early_warning.store import Store
from shared_models.data.cohort import CohortArrays
from shared_models.data.contract import default_spec
from simulations.cli import app
from simulations.scoring_figures import train_risk_model

SPEC = default_spec()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def model_dir(consortium_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from shared_models.data.loader import load_cohort

    train = CohortArrays.concatenate(
        [load_cohort(consortium_dir / f"institution_0{k}", SPEC) for k in (1, 2)]
    )
    model = train_risk_model(train, SPEC, tmp_path_factory.mktemp("model"), max_epochs=4)
    # Calibrated on the reported institution's own validation split, as adoption does.
    calibrate_model_dir(model, consortium_dir / "institution_03", SPEC, method="sigmoid")
    return model


@pytest.fixture(scope="module")
def report(
    consortium_dir: Path, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> ReportResult:
    out = tmp_path_factory.mktemp("report")
    return score_and_report(
        consortium_dir / "institution_03",
        model_dir,
        out,
        observed_weeks=6,
        db_path=out / "client.sqlite",
    )


@dataclass
class _Page(HTMLParser):
    """What the report's HTML holds, by tag."""

    images: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    rows: list[dict[str, str]] = field(default_factory=list)
    headers: list[str] = field(default_factory=list)
    sparklines: int = 0
    scripts: int = 0
    meta: list[dict[str, str]] = field(default_factory=list)
    _in_th: bool = False

    def __post_init__(self) -> None:
        super().__init__()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag in ("link", "a", "script", "iframe", "source") and ("href" in a or "src" in a):
            self.links.append(a.get("href") or a.get("src", ""))
        if tag == "tr" and "data-tier" in a:
            self.rows.append(a)
        if tag == "svg" and a.get("class") == "spark":
            self.sparklines += 1
        if tag == "script":
            self.scripts += 1
        if tag == "meta":
            self.meta.append(a)
        self._in_th = tag == "th"

    def handle_data(self, data: str) -> None:
        if self._in_th:
            self.headers.append(data)
            self._in_th = False


def _parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text("utf-8"))
    return page


def test_report_html_is_self_contained_with_table_and_plots(report: ReportResult) -> None:
    page = _parse(report.html)
    n = len(report.warning.scores)
    assert len(page.rows) == n
    assert {"Student", "Tier", "P(at risk)", "Top reasons", "Recommendations"} <= set(page.headers)
    # distribution, by program, by week, reliability diagram (+ later sections' figures)
    assert len(page.images) >= 4
    text = report.html.read_text("utf-8")
    assert 'id="reliability"' in text and 'id="ece"' in text
    assert "nothing left the institution" in text  # the calibration's method line
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png = matplotlib.image.imread(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert png.shape[0] > 100 and png.shape[1] > 200
    assert page.sparklines == 2 * n  # risk and attendance per student
    assert page.links == ["data:,"]  # the favicon placeholder; nothing else is fetched
    csp = [m["content"] for m in page.meta if m.get("http-equiv") == "Content-Security-Policy"]
    assert csp and "default-src 'none'" in csp[0]


def test_report_rows_are_ordered_by_risk_and_carry_reasons(report: ReportResult) -> None:
    text = report.html.read_text("utf-8")
    scores = report.warning.scores
    order = np.argsort(-scores.probability, kind="stable")
    positions = [text.index(f"<code>{scores.student_ids[i]}</code>") for i in order]
    assert positions == sorted(positions)
    flagged = [i for i in range(len(scores)) if report.warning.recommendations[i]]
    assert flagged and report.warning.recommendations[flagged[0]][0].action in text


def test_report_shows_pseudonymous_ids_only(report: ReportResult, consortium_dir: Path) -> None:
    page = report.html.read_text("utf-8")
    # The fairness section names protected attributes as groupings, never as anyone's reason.
    start, end = page.index('<h2 id="fairness">'), page.index("<h2>Students</h2>")
    text = page[:start] + page[end:] + report.csv.read_text("utf-8")
    students = pd.read_csv(consortium_dir / "institution_03" / "students.csv")
    assert str(consortium_dir) not in text  # no local paths either
    assert "prior_gpa" not in text and "gender" not in text  # no attribute is named a reason
    assert set(pd.read_csv(report.csv)["student_id"]) <= set(students["student_id"])


def test_csv_lists_every_scored_student_with_indicators(report: ReportResult) -> None:
    frame = pd.read_csv(report.csv)
    assert len(frame) == len(report.warning.scores)
    assert {"student_id", "tier", "probability", "reasons", "recommendations"} <= set(frame)
    assert {"attendance_last4", "quizzes_missed_last4", "quiz_score_trend"} <= set(frame)
    assert frame["probability"].is_monotonic_decreasing
    assert set(frame["tier"]) <= {"low", "moderate", "high"}


def test_recorded_actions_appear_in_the_next_report(
    report: ReportResult, consortium_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    db = report.html.parent / "client.sqlite"
    sid = str(report.warning.scores.student_ids[0])
    shutil.copy(db, tmp_path / "client.sqlite")
    with Store(tmp_path / "client.sqlite") as store:
        store.record_action(sid, "referred", "to the writing centre")
    again = score_and_report(
        consortium_dir / "institution_03",
        model_dir,
        tmp_path / "out",
        observed_weeks=6,
        db_path=tmp_path / "client.sqlite",
    )
    assert again.run_id == 2
    row = pd.read_csv(again.csv).set_index("student_id").loc[sid]
    assert row["last_action"].startswith("referred (") and "writing centre" in row["last_action"]


def test_report_command_writes_html_and_csv(
    consortium_dir: Path, model_dir: Path, tmp_path: Path
) -> None:
    args = ["client", "report", "--data", str(consortium_dir / "institution_02")]
    result = CliRunner().invoke(
        app, [*args, "--model", str(model_dir), "--out", str(tmp_path), "--max-rows", "10"]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "report.html").is_file() and (tmp_path / "students.csv").is_file()
    assert len(_parse(tmp_path / "report.html").rows) == 10
    assert len(pd.read_csv(tmp_path / "students.csv")) > 10


# --- the browser check: headless Chromium over the DevTools protocol (no downloads) ---------

_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--remote-debugging-port=0",
]
_PAGE_STATE = """JSON.stringify({
  rows: document.querySelectorAll('#students tbody tr').length,
  images: Array.from(document.images).map(i => i.complete && i.naturalWidth > 0),
  sparklines: document.querySelectorAll('svg.spark polyline').length,
  firstHigh: document.querySelector('#students tbody tr').dataset.tier,
  reliability: (document.getElementById('reliability') || {}).naturalWidth || 0,
  ece: (document.getElementById('ece') || {}).textContent || '',
})"""
_SORT_BY_P = """(() => {
  const th = Array.from(document.querySelectorAll('#students th'))
    .find(h => h.textContent === 'P(at risk)');
  th.click();
  const ps = Array.from(document.querySelectorAll('#students tbody tr'))
    .map(r => parseFloat(r.cells[th.cellIndex].dataset.sort));
  return JSON.stringify(ps);
})()"""


class _DevTools:
    """A minimal Chrome DevTools Protocol client on one page (flattened session)."""

    def __init__(self, ws: Any) -> None:
        self.ws, self.events, self._next = ws, [], 0
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.session: str | None = None
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                self._pending.pop(msg["id"]).set_result(msg)
            else:
                self.events.append(msg)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        future = asyncio.get_running_loop().create_future()
        self._pending[self._next] = future
        msg: dict[str, Any] = {"id": self._next, "method": method, "params": params}
        if self.session:
            msg["sessionId"] = self.session
        await self.ws.send(json.dumps(msg))
        reply = await asyncio.wait_for(future, 30)
        assert "error" not in reply, reply
        result: dict[str, Any] = reply["result"]
        return result

    def close(self) -> None:
        self._reader.cancel()

    async def evaluate(self, expression: str) -> Any:
        reply = await self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        return json.loads(reply["result"]["value"])


async def _devtools_address(port_file: Path, deadline: float) -> tuple[str, str]:
    """Chromium writes its DevTools port and browser path here once it listens."""
    while True:
        lines = port_file.read_text().split() if port_file.exists() else []
        if len(lines) >= 2:
            return lines[0], lines[1]
        assert time.monotonic() < deadline, "chromium did not start"
        await asyncio.sleep(0.05)


async def _open_in_chromium(page: Path, profile: Path) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    proc = subprocess.Popen(
        [str(CHROMIUM), *_FLAGS, f"--user-data-dir={profile}", "about:blank"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        port, path = await _devtools_address(profile / "DevToolsActivePort", deadline)
        async with connect(f"ws://127.0.0.1:{port}{path}", max_size=None) as ws:
            cdp = _DevTools(ws)
            target = await cdp.send("Target.createTarget", url="about:blank")
            attached = await cdp.send(
                "Target.attachToTarget", targetId=target["targetId"], flatten=True
            )
            cdp.session = attached["sessionId"]
            for domain in ("Page", "Network", "Runtime", "Log"):
                await cdp.send(f"{domain}.enable")
            await cdp.send(
                "Emulation.setDeviceMetricsOverride",
                width=1280,
                height=1000,
                deviceScaleFactor=1,
                mobile=False,
            )
            await cdp.send("Page.navigate", url=page.as_uri())
            while not any(e.get("method") == "Page.loadEventFired" for e in cdp.events):
                assert time.monotonic() < deadline + 30, "the report did not finish loading"
                await asyncio.sleep(0.05)
            state = await cdp.evaluate(_PAGE_STATE)
            sorted_ps = await cdp.evaluate(_SORT_BY_P)
            shot = await cdp.send("Page.captureScreenshot", format="png")
            await asyncio.sleep(0.2)  # let late console messages or requests arrive
            cdp.close()
            return {"state": state, "sorted": sorted_ps, "shot": shot["data"], "events": cdp.events}
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_opens_in_headless_chromium_without_errors_or_requests(
    report: ReportResult, tmp_path: Path
) -> None:
    pytest.importorskip("websockets", reason="the browser check drives chromium via websockets")
    profile = tmp_path / "profile"
    profile.mkdir()
    seen = asyncio.run(_open_in_chromium(report.html.resolve(), profile))

    requests = [
        e["params"]["request"]["url"]
        for e in seen["events"]
        if e["method"] == "Network.requestWillBeSent"
    ]
    external = [u for u in requests if u != report.html.resolve().as_uri()]
    assert all(u.startswith("data:") for u in external), external  # embedded plots only
    errors = [
        e["params"]
        for e in seen["events"]
        if e["method"] == "Runtime.exceptionThrown"
        or (
            e["method"] == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert")
        )
        or (e["method"] == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")
    ]
    assert errors == []

    n = len(report.warning.scores)
    assert seen["state"]["rows"] == n
    assert len(seen["state"]["images"]) >= 4 and all(seen["state"]["images"])
    assert seen["state"]["reliability"] > 200  # the reliability diagram was drawn
    ece = r"calibration error .*: \d\.\d{3} calibrated, \d\.\d{3}\s+raw"
    assert re.search(ece, seen["state"]["ece"], re.S), seen["state"]["ece"]
    assert seen["state"]["sparklines"] == 2 * n
    assert seen["sorted"] == sorted(seen["sorted"])  # clicking the header sorted the table
    assert seen["sorted"] != sorted(seen["sorted"], reverse=True)

    png = base64.b64decode(seen["shot"])
    (tmp_path / "report.png").write_bytes(png)
    pixels = matplotlib.image.imread(io.BytesIO(png))[..., :3]
    assert pixels.shape[:2] == (1000, 1280)
    # The tier cards and the histogram bars are drawn in the tier colours: look for them.
    for colour in ("#0072b2", "#e69f00", "#d55e00"):
        rgb = np.array([int(colour[k : k + 2], 16) for k in (1, 3, 5)]) / 255
        assert (np.abs(pixels - rgb).max(axis=-1) < 0.03).sum() > 2000, colour
