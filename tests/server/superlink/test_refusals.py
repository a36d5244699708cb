"""Refused node keys named in the SuperLink's log; a revoked key's node told why.

The seam: Flower's own refusal (its error catalog's status and JSON for a failed activation)
passing out through the public listener's filter, and Flower's own ``FlowerError.from_json``
reading it back as the SuperNode does. The real processes are in
``tests/deploy/test_refused_nodes.py``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER
from flwr.supercore.error import ApiErrorCode, FlowerError
from flwr.supercore.error.catalog import API_ERROR_MAP

from privacy.keys import init_institution_keys, load_node_public_key, public_key_line
from server.institutions import REGISTRY_FILE, Registry, save_registry
from server.superlink.flower_surface import ACTIVATE_NODE_PATH
from server.superlink.refusals import NodeRefusals
from server.superlink.serve import PublicPlane
from shared_models.deployment import REVOKED_NOTICE

ACTIVATE = ACTIVATE_NODE_PATH.text
CODE = ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED


def _pem(path: Path) -> bytes:
    return load_node_public_key(path).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, Path]:
    """Public key files of uni-a (enrolled), uni-c (revoked), uni-r (replaced), a stranger."""
    paths = {n: init_institution_keys(tmp_path / n, n).public_key for n in ("uni-a", "uni-c")}
    paths["uni-r"] = init_institution_keys(tmp_path / "uni-r", "uni-r").public_key
    paths["uni-r2"] = init_institution_keys(tmp_path / "uni-r2", "uni-r").public_key
    paths["stranger"] = init_institution_keys(tmp_path / "stranger", "stranger").public_key
    line = {n: public_key_line(load_node_public_key(p)) for n, p in paths.items()}
    registry = (
        Registry()
        .with_institution("uni-a", line["uni-a"])
        .with_institution("uni-c", line["uni-c"])
        .with_institution("uni-r", line["uni-r"])
        .without("uni-c")
        .with_institution("uni-r", line["uni-r2"], replace=True)
    )
    save_registry(tmp_path / "state", registry)
    return paths


def _refusals(state: Path) -> NodeRefusals:
    return NodeRefusals(
        state / REGISTRY_FILE,
        key_header=FLEET_HTTP_PUBLIC_KEY_HEADER,
        activate_path=ACTIVATE,
        activation_failed=CODE,
    )


def _flower_refusal(status: int | None = None, code: int = CODE) -> tuple[int, bytes]:
    """What Flower's error translator sends for ``code`` (its catalog's status and JSON)."""
    spec = API_ERROR_MAP[code]
    body = FlowerError(code, "server-side detail").to_json(spec.public_message)
    return status or spec.http_status_code, json.dumps(body).encode()


def _through_the_filter(
    state: Path, pem: bytes | None, answer: tuple[int, bytes], path: str = ACTIVATE
) -> tuple[int, bytes]:
    """Send one request through `PublicPlane` to an app answering ``answer``; the response."""
    status, body = answer

    async def flower(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": body[:10], "more_body": True})
        await send({"type": "http.response.body", "body": body[10:]})

    headers = [(b"content-type", b"application/protobuf")]
    if pem is not None:
        headers.append((FLEET_HTTP_PUBLIC_KEY_HEADER.encode(), base64.b64encode(pem)))
    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers,
        "client": ("192.0.2.7", 5000),
    }
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    plane = PublicPlane(flower, frozenset({("POST", path)}), _refusals(state))
    asyncio.run(plane(scope, receive, send))
    start = sent[0]
    data = b"".join(m.get("body", b"") for m in sent[1:])
    length = dict(start["headers"]).get(b"content-length")
    assert length is None or int(length) == len(data)
    return start["status"], data


def test_a_revoked_key_is_named_in_the_log_and_its_node_is_told_what_to_do(
    tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "server.superlink.refusals")
    status, body = _through_the_filter(tmp_path / "state", _pem(keys["uni-c"]), _flower_refusal())
    assert status == 412
    # What the SuperNode shows: Flower's own parsing of the refusal, with the note as `extra`.
    error = FlowerError.from_json(body.decode())
    assert error is not None and error.code == CODE
    assert error.message == "Failed to activate SuperNode."
    assert error.public_details is not None
    assert error.public_details.startswith(f"{REVOKED_NOTICE}: the key of uni-c (SHA256:")
    assert "was revoked by the consortium operator" in error.public_details
    assert "edufl client keys init --force" in error.public_details
    assert "edufl server enrol NEW.pub --name uni-c" in error.public_details
    assert "refused node activation from 192.0.2.7: revoked key of uni-c (SHA256:" in caplog.text


def test_a_replaced_key_is_told_it_was_replaced(tmp_path: Path, keys: dict[str, Path]) -> None:
    _, body = _through_the_filter(tmp_path / "state", _pem(keys["uni-r"]), _flower_refusal())
    error = FlowerError.from_json(body.decode())
    assert error is not None and error.public_details is not None
    assert "the key of uni-r" in error.public_details and "was replaced" in error.public_details


def test_an_unenrolled_key_is_named_by_fingerprint_and_told_nothing_more(
    tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "server.superlink.refusals")
    refusal = _flower_refusal()
    assert _through_the_filter(tmp_path / "state", _pem(keys["stranger"]), refusal) == refusal
    assert "refused node activation from 192.0.2.7: unenrolled key SHA256:" in caplog.text
    assert "BEGIN PUBLIC KEY" not in caplog.text


def test_an_enrolled_key_refused_is_named_by_institution(
    tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "server.superlink.refusals")
    refusal = _flower_refusal()
    assert _through_the_filter(tmp_path / "state", _pem(keys["uni-a"]), refusal) == refusal
    assert "enrolled institution uni-a" in caplog.text


def test_a_request_of_an_unregistered_node_is_named_once_a_minute(
    tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "server.superlink.refusals")
    unauthorized = (401, b'{"detail":"Invalid SuperNode authentication"}')
    refusals = _refusals(tmp_path / "state")
    scope = {
        "path": "/v1/fleet/send-node-heartbeat",
        "headers": [(FLEET_HTTP_PUBLIC_KEY_HEADER.encode(), base64.b64encode(_pem(keys["uni-c"])))],
        "client": ("192.0.2.7", 1),
    }
    for _ in range(3):
        assert refusals.refused(scope, *unauthorized) is None  # the response is Flower's
    assert caplog.text.count("revoked key of uni-c") == 1
    assert "request /v1/fleet/send-node-heartbeat" in caplog.text


def test_answers_that_are_no_node_refusal_pass_unchanged(
    tmp_path: Path, keys: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "server.superlink.refusals")
    state, pem = tmp_path / "state", _pem(keys["uni-c"])
    ok = (200, b"\x08\x07" * 20)
    assert _through_the_filter(state, pem, ok) == ok
    other = _flower_refusal(code=ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL)
    assert _through_the_filter(state, pem, other) == other
    assert _through_the_filter(state, None, _flower_refusal()) == _flower_refusal()
    assert caplog.text == ""
