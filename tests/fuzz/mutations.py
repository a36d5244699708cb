"""Hypothesis strategies that turn a valid file into a hostile one.

Two families: byte-level damage any file can suffer (flips, truncation, random bytes, other
encodings, absurd lines) and structure-aware changes that keep a file parseable but make it
wrong (a TOML key with a value of the wrong type, a CSV column missing or repeated, an
identifier column, a number that is NaN or 1e309).
"""

from __future__ import annotations

import copy
import datetime as dt
import math
from typing import Any

import tomli_w
from hypothesis import strategies as st

#: Cell or token texts that have broken parsers before.
HOSTILE_TOKENS = (
    "",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "1e309",
    "-1e309",
    "1e-400",
    "9" * 400,
    "-0",
    "0x1F",
    "1_000",
    "True",
    "None",
    "null",
    "?",
    '"',
    "'",
    '""',
    "\\",
    "\x00",
    "\t",
    "\r",
    "\n",
    ",",
    ";",
    "=",
    "[",
    "]",
    "{",
    "}",
    "[[",
    '"""',
    "\u202e",  # right-to-left override
    "\u200b",  # zero-width space
    "\ufeff",
    "é",
    "학생",
    "\uff10\uff11",  # full-width digits
    "\u0661\u0662",  # Arabic-Indic digits
    "😀",
    "jane.doe@example.edu",
    "123-45-6789",
    "1999-04-01",
    "x" * 5000,
)

#: Values a TOML or JSON field could hold instead of the right one.
HOSTILE_VALUES: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from(
        [
            0,
            -1,
            1,
            2**63,
            -(2**63) - 1,
            10**40,
            0.0,
            -0.0,
            1e308,
            -1e308,
            5e-324,
            math.nan,
            math.inf,
            -math.inf,
            True,
            False,
            "",
            " ",
            "x" * 2000,
            "nan",
            "1e309",
            "../../etc/passwd",
            "/dev/zero",
            "a\x00b",
            "😀",
            [],
            [1, "a"],
            {},
            {"nested": {"deeper": [1, 2]}},
            dt.datetime(1970, 1, 1, tzinfo=dt.UTC),
            dt.date(2099, 12, 31),
        ]
    ),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.lists(st.integers(-5, 5), max_size=4),
)


@st.composite
def byte_damage(draw: st.DrawFn, valid: bytes) -> bytes:
    """Damage any file might suffer on a disk, in a mail client or a text editor."""
    kind = draw(
        st.sampled_from(
            (
                "flip",
                "truncate",
                "random",
                "empty",
                "encoding",
                "bom",
                "insert",
                "long_line",
                "nul",
                "line_endings",
                "duplicate_lines",
                "drop_lines",
                "splice",
            )
        )
    )
    if kind == "flip" and valid:
        data = bytearray(valid)
        for _ in range(draw(st.integers(1, 8))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(data)
    if kind == "truncate":
        return valid[: draw(st.integers(0, max(len(valid) - 1, 0)))]
    if kind == "random":
        return draw(st.binary(max_size=600))
    if kind == "encoding":
        codec = draw(st.sampled_from(("utf-16", "utf-16-le", "utf-16-be", "utf-32", "cp1252")))
        text = valid.decode("utf-8", "replace")
        if codec == "cp1252":
            text = text.replace("e", "é", 3)
        return text.encode(codec, "replace")
    if kind == "bom":
        return b"\xef\xbb\xbf" + valid
    if kind == "insert":
        token = draw(st.sampled_from(HOSTILE_TOKENS)).encode("utf-8", "surrogatepass")
        i = draw(st.integers(0, len(valid)))
        return valid[:i] + token + valid[i:]
    if kind == "long_line":
        i = draw(st.integers(0, len(valid)))
        return valid[:i] + draw(st.sampled_from((b"x", b"9", b"[", b"\xff"))) * 200_000 + valid[i:]
    if kind == "nul":
        i = draw(st.integers(0, len(valid)))
        return valid[:i] + b"\x00" * draw(st.integers(1, 16)) + valid[i:]
    if kind == "line_endings":
        return valid.replace(b"\n", draw(st.sampled_from((b"\r\n", b"\r", b"\n\n", b"\x85"))))
    lines = valid.split(b"\n")
    if kind == "duplicate_lines" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        return b"\n".join(lines[: i + 1] + [lines[i]] * draw(st.integers(1, 3)) + lines[i + 1 :])
    if kind == "drop_lines" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        j = draw(st.integers(i, len(lines)))
        return b"\n".join(lines[:i] + lines[j:])
    if kind == "splice" and valid:
        i, j = sorted(draw(st.lists(st.integers(0, len(valid)), min_size=2, max_size=2)))
        return valid[:i] + draw(st.binary(min_size=1, max_size=40)) + valid[j:]
    return b""


# --- TOML -----------------------------------------------------------------------------------


def _paths(obj: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a parsed TOML/JSON document (dict keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


def _set(obj: Any, path: tuple[Any, ...], value: Any, *, delete: bool = False) -> None:
    for key in path[:-1]:
        obj = obj[key]
    if delete:
        del obj[path[-1]]
    else:
        obj[path[-1]] = value


@st.composite
def wrong_document(draw: st.DrawFn, valid: dict[str, Any]) -> dict[str, Any]:
    """A parsed document with one to three fields changed, removed or added."""
    doc = copy.deepcopy(valid)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        action = draw(st.sampled_from(("replace", "replace", "delete", "add")))
        if action == "add" or not paths:
            target: Any = doc
            if paths:
                parent = draw(st.sampled_from(paths))
                for key in parent:
                    target = target[key]
            if isinstance(target, dict):
                key = draw(st.sampled_from(("extra", "Name", "min ", "id", "é", "x" * 300)))
                target[key] = copy.deepcopy(draw(HOSTILE_VALUES))
            elif isinstance(target, list):
                target.append(copy.deepcopy(draw(HOSTILE_VALUES)))
            continue
        path = draw(st.sampled_from(paths))
        if action == "delete":
            _set(doc, path, None, delete=True)
        else:  # a copy: the sampled constants ([], {}) must never be mutated by a later draw
            _set(doc, path, copy.deepcopy(draw(HOSTILE_VALUES)))
    return doc


def dump_toml(doc: dict[str, Any]) -> bytes | None:
    """TOML bytes of ``doc``, or None when TOML cannot express it (e.g. a None inside)."""
    try:
        return tomli_w.dumps(doc).encode("utf-8", "surrogatepass")
    except (TypeError, ValueError):
        return None


def deep_toml(depth: int, kind: str) -> bytes:
    """``a = [[[...]]]`` or ``a = {b = {b = ...}}`` nested ``depth`` levels."""
    if kind == "array":
        return b"a = " + b"[" * depth + b"]" * depth + b"\n"
    if kind == "inline":
        return b"a = " + b"{b = " * depth + b"1" + b"}" * depth + b"\n"
    return b"".join(b"[" + b".".join([b"t"] * (i + 1)) + b"]\nx = 1\n" for i in range(depth))


@st.composite
def hostile_toml(draw: st.DrawFn, valid_text: bytes, valid_doc: dict[str, Any]) -> bytes:
    """Byte damage, a structurally valid but wrong document, or absurd nesting."""
    family = draw(st.sampled_from(("bytes", "document", "document", "nesting")))
    if family == "bytes":
        return draw(byte_damage(valid_text))
    if family == "nesting":
        kind = draw(st.sampled_from(("array", "inline", "tables")))
        depth = draw(st.sampled_from((50, 500, 3000) if kind != "tables" else (50, 300)))
        return deep_toml(depth, kind)
    doc = draw(wrong_document(valid_doc))
    dumped = dump_toml(doc)
    return dumped if dumped is not None else draw(byte_damage(valid_text))
