"""Small helpers every package's typer commands share: user errors, logging set-up."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import typer

from shared_models.errors import EduflError

P = ParamSpec("P")
R = TypeVar("R")

#: Exit code for input a user can fix (bad file, bad option); 1 is left for "checked and failed".
USER_ERROR = 2


def user_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn an `EduflError` into one clear line on stderr and exit code 2, no traceback.

    So is an `OSError` (a full disk, a folder given where a file is expected, no permission):
    the user fixes it, and the line names the path. Outputs are written to a temporary name
    and renamed into place, so such a failure leaves the previous output as it was.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except EduflError as exc:
            typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
            raise typer.Exit(USER_ERROR) from None
        except OSError as exc:
            typer.secho(f"error: {_describe_os_error(exc)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(USER_ERROR) from None

    return wrapper


def _describe_os_error(exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    paths = [str(p) for p in (exc.filename, exc.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def configure_logging(verbose: int) -> None:
    """Only the CLI configures logging; library code just logs."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )


def new_app(help_text: str) -> typer.Typer:
    """A typer app with edufl's defaults: no locals in tracebacks (they may hold student data)."""
    return typer.Typer(
        help=help_text,
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        rich_markup_mode=None,
        add_completion=False,
    )
