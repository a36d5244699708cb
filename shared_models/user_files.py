"""Reading the text files a user hands edufl (TOML specs, mappings, rules, JSON cards, ledgers).

Every such reader wants the same three failure kinds and nothing else: the file is missing
(`FileNotFoundError`), unreadable or not UTF-8 (`OSError` / `UnicodeDecodeError`), or not valid
TOML or JSON. The standard parsers raise other things for hostile input: `tomllib` and `json`
raise `RecursionError` for deeply nested arrays (``[[[[...`` a thousand deep), and both a
plain `ValueError` for an integer of more than 4300 digits. `loads_toml` and `loads_json` turn
those into the decode errors callers already handle, so a hostile file cannot escape as a
traceback.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

_BOM = "\ufeff"


def read_text(path: Path) -> str:
    """A file's UTF-8 text; a leading byte-order mark (Windows editors add one) is dropped.

    Raises:
        FileNotFoundError: no such file.
        OSError: unreadable (a directory, no permission).
        UnicodeDecodeError: not UTF-8 (e.g. saved as UTF-16); `describe_read_error` says so.
    """
    return Path(path).read_text("utf-8").removeprefix(_BOM)


def loads_toml(text: str) -> dict[str, Any]:
    """`tomllib.loads` that raises only `tomllib.TOMLDecodeError` for bad input."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        raise
    except RecursionError:
        raise tomllib.TOMLDecodeError(
            "arrays or tables nested too deeply to parse; flatten the file"
        ) from None
    except ValueError as exc:  # an integer with more than 4300 digits
        raise tomllib.TOMLDecodeError(str(exc).split(";")[0]) from None


def loads_json(text: str | bytes) -> Any:
    """`json.loads` that raises only `json.JSONDecodeError` (a `ValueError`) for bad input."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("arrays or objects nested too deeply", "", 0) from None
    except (ValueError, TypeError) as exc:  # e.g. an integer with more than 4300 digits
        raise json.JSONDecodeError(str(exc), "", 0) from None


def load_toml(path: Path) -> dict[str, Any]:
    """`read_text` then `loads_toml` (raises what those raise)."""
    return loads_toml(read_text(path))


def describe_read_error(exc: BaseException) -> str:
    """A short, actionable reason for a `read_text` failure."""
    if isinstance(exc, UnicodeDecodeError):
        return (
            f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "save the file as UTF-8"
        )
    if isinstance(exc, IsADirectoryError):
        return "a folder, not a file"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return str(exc) or type(exc).__name__
