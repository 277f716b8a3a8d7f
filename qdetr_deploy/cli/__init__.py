"""The ``qdetr-deploy`` Click group: argument parsing, progress display and error-to-exit-code mapping.

Each command lives in its own module under this package and is a thin wrapper over one library function.
User mistakes (:class:`~qdetr_deploy.errors.QDetrError`) become one line on stderr and exit code 2;
``--debug`` shows the traceback instead. Library warnings (``logging``, logger ``qdetr_deploy.*``) are
one line each on stderr, ``warning: ...``.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from qdetr_deploy import __version__
from qdetr_deploy.errors import QDetrError


class LazyGroup(click.Group):
    """A group whose commands live in modules imported only when a command is looked up (Click's
    "LazyGroup" pattern): ``lazy_commands`` maps a command name to its module under ``qdetr_deploy.cli``,
    which lists its commands in ``COMMANDS``."""

    def __init__(self, *args: Any, lazy_commands: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(self.commands) | set(self.lazy_commands))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy_commands:
            module = importlib.import_module(f"{__name__}.{self.lazy_commands[name]}")
            for command in module.COMMANDS:
                self.add_command(command)
        return self.commands.get(name)


class _Group(LazyGroup):
    """Maps QDetrError, file-system errors and Click's usage errors to one line and exit code 2."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.exceptions.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.echo(f"error: {' '.join(e.format_message().split())}", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("error: aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx: click.Context):  # noqa: D401
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except (QDetrError, OSError, MemoryError) as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(e) if isinstance(e, QDetrError) else f"{type(e).__name__}: {e}"
            click.echo(f"error: {' '.join(msg.split())}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("error: interrupted", err=True)
            sys.exit(130)


class _StderrHandler(logging.Handler):
    """Writes ``warning: <message>`` to the current ``sys.stderr`` (looked up at each record, so a
    redirected stderr, e.g. Click's test runner, receives it)."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(f"{record.levelname.lower()}: {' '.join(record.getMessage().split())}\n")
        sys.stderr.flush()


def _setup_logging() -> None:
    logger = logging.getLogger("qdetr_deploy")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler(logging.WARNING)
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING)


# command name -> module under qdetr_deploy.cli; modules are imported only when their command runs (or for
# the group's --help), so `bench` of an ONNX Runtime engine never imports torch.
LAZY_COMMANDS = {
    "bench": "bench",
    "build-engine": "build_engine",
    "demo": "demo",
    "distill": "distill",
    "evaluate": "evaluate",
    "export": "export",
    "inspect": "inspect_cmd",
    "make-dataset": "make_dataset",
    "predict": "predict",
    "quantize": "quantize",
    "train": "train",
}


@click.group(cls=_Group, lazy_commands=LAZY_COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qdetr-deploy")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Quantized detection transformers (Q-DETR): distill, export, build engines, benchmark."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    _setup_logging()


def main() -> None:
    """Console-script entry point."""
    cli(obj={})
