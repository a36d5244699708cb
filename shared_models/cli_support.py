"""Small helpers every package's typer commands share: user errors, logging set-up, the app.

Command modules import only this, typer and the standard library at the top: each command
imports what it runs inside its body, so `edufl --help` and the light verbs start without torch
or Flower (tests/test_startup.py checks it).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import click
import typer
from typer.core import TyperCommand, TyperGroup

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
    """Only the CLI configures logging; library code just logs.

    A library logger with a handler of its own (Flower's ``flwr`` logger prints to the console
    and also propagates) has already shown its records: the root handler skips them, so each
    line appears once, whether the library is imported before or after this call.
    """
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(
        level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    show_each_record_once()


def show_each_record_once() -> None:
    """Make the root logger's handlers skip records a library's own handler has printed.

    Also for processes edufl's CLI did not start (the ServerApp under a SuperLink, Ray's
    workers): Opacus calls ``logging.basicConfig`` when imported, and Flower's ``flwr`` logger
    prints and propagates, so each of Flower's lines would otherwise appear twice there.
    """
    for handler in logging.getLogger().handlers:
        if _shown_elsewhere_filter not in handler.filters:
            handler.addFilter(_shown_elsewhere_filter)


def _shown_elsewhere_filter(record: logging.LogRecord) -> bool:
    """False for a record a handler between its logger and the root has already emitted."""
    logger: logging.Logger | None = logging.root.manager.loggerDict.get(record.name)  # type: ignore[assignment]
    while isinstance(logger, logging.Logger) and logger is not logging.root:
        if any(
            record.levelno >= h.level and not isinstance(h, logging.NullHandler)
            for h in logger.handlers
        ):
            return False
        if not logger.propagate:
            break
        logger = logger.parent
    return True


def new_app(help_text: str) -> typer.Typer:
    """A typer app with edufl's defaults: plain click help, no locals in tracebacks.

    Locals stay out of tracebacks because they may hold student data. Help is plain text
    (``rich_markup_mode=None``), which also keeps rich out of every start-up.
    """
    return _App(
        help=help_text,
        cls=_PlainGroup,
        no_args_is_help=True,
        pretty_exceptions_show_locals=False,
        rich_markup_mode=None,
        add_completion=False,
    )


def _unescape_rich(record: tuple[str, str]) -> tuple[str, str]:
    # Typer 0.20 escapes the "[default: ...]" / "[required]" suffix for rich whenever rich is
    # installed, even when help is rendered as plain text: undo it so no "\[" shows.
    name, help_text = record
    return name, help_text.replace("\\[", "[")


def _format_options(
    command: click.Command, ctx: click.Context, formatter: click.HelpFormatter
) -> None:
    """Typer's "Arguments" and "Options" sections, without the rich escapes."""
    sections: dict[str, list[tuple[str, str]]] = {"argument": [], "option": []}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is not None and param.param_type_name in sections:
            sections[param.param_type_name].append(_unescape_rich(record))
    for title, kind in (("Arguments", "argument"), ("Options", "option")):
        if sections[kind]:
            with formatter.section(title):
                formatter.write_dl(sections[kind])


class _PlainCommand(TyperCommand):
    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_options(self, ctx, formatter)


class _PlainGroup(TyperGroup):
    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        _format_options(self, ctx, formatter)
        self.format_commands(ctx, formatter)


class _App(typer.Typer):
    """A `typer.Typer` whose commands render their help with `_PlainCommand`."""

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("cls", _PlainCommand)
        return super().command(*args, **kwargs)
