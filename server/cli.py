"""`llmrec-server`: serve a model bundle over gRPC. The flags, LLMREC_* variables and config file are ServerSettings'."""

from __future__ import annotations

import asyncio

import typer

from llmrec.manifest import BundleError

from llmrec.server import logs
from llmrec.server.settings import parse_settings
from llmrec.server.state import StateError

# A Typer app only so that the console script and typer's CliRunner keep working: it hands every argument,
# --help included, to parse_settings, which builds the command line from ServerSettings.
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []})
def main(ctx: typer.Context) -> None:
    """Serve a model bundle over gRPC (llmrec.v1.Recommender, health checking and reflection)."""
    try:
        settings = parse_settings(ctx.args)
        settings.resolve_bundle_dir()  # fail before binding when there is nothing to serve
    except (ValueError, BundleError) as error:
        _fail(str(error))
    logs.configure(settings.log_level, settings.log_format)

    from llmrec.server.app import serve  # imported late: `--help` should not load ONNX Runtime

    try:
        asyncio.run(serve(settings))
    except BundleError as error:
        _fail(f"cannot serve the bundle: {error}")
    except StateError as error:
        _fail(f"cannot use the state directory: {error}")
    except OSError as error:
        _fail(str(error))


def _fail(message: str) -> None:
    for line in message.splitlines():
        typer.echo(f"llmrec-server: {line}", err=True)
    raise typer.Exit(code=2)
