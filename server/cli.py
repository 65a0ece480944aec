"""`llmrec-server`: serve a model bundle over gRPC. Every option can also come from an LLMREC_* variable."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmrec.manifest import BundleError

from server.settings import MIB, ServerSettings

app = typer.Typer(add_completion=False, help=__doc__, pretty_exceptions_enable=False)


@app.command()
def main(
    bundle_root: Annotated[Path | None, typer.Option(
        envvar="LLMREC_BUNDLE_ROOT", help="Serve the newest bundle under this directory.")] = None,
    bundle: Annotated[Path | None, typer.Option(
        envvar="LLMREC_BUNDLE", help="Serve exactly this bundle directory (overrides --bundle-root).")] = None,
    host: Annotated[str, typer.Option(envvar="LLMREC_HOST", help="Interface to listen on (0.0.0.0 for all).")]
        = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="LLMREC_PORT", help="TCP port; 0 picks a free one.")] = 50051,
    max_k: Annotated[int, typer.Option(envvar="LLMREC_MAX_K", help="Largest k a request may ask for.")] = 100,
    max_request_history: Annotated[int, typer.Option(
        envvar="LLMREC_MAX_REQUEST_HISTORY", help="Most history items per request or session.")] = 500,
    max_text_chars: Annotated[int, typer.Option(
        envvar="LLMREC_MAX_TEXT_CHARS", help="Longest allowed text field or query, in characters.")] = 2000,
    intra_op_threads: Annotated[int, typer.Option(
        envvar="LLMREC_INTRA_OP_THREADS", help="ONNX Runtime threads per inference; 0 = cores available.")] = 0,
    prefer_gpu: Annotated[bool, typer.Option(
        "--prefer-gpu/--cpu-only", envvar="LLMREC_PREFER_GPU",
        help="Use CUDA with the FP32 model when a GPU is present; INT8 on CPU otherwise.")] = True,
    grace_seconds: Annotated[float, typer.Option(
        envvar="LLMREC_GRACE_SECONDS", help="Seconds in-flight RPCs may finish after SIGTERM/SIGINT.")] = 5.0,
    max_message_mib: Annotated[int, typer.Option(
        envvar="LLMREC_MAX_MESSAGE_MIB", help="gRPC send/receive message limit in MiB.")] = 16,
    max_concurrent_rpcs: Annotated[int | None, typer.Option(
        envvar="LLMREC_MAX_CONCURRENT_RPCS", help="RPCs admitted at once (others: RESOURCE_EXHAUSTED).")] = None,
    session_idle_timeout: Annotated[float, typer.Option(
        envvar="LLMREC_SESSION_IDLE_TIMEOUT", help="Seconds a Session may stay silent before it is closed.")]
        = 300.0,
    log_level: Annotated[str, typer.Option(
        envvar="LLMREC_LOG_LEVEL", help="debug, info, warning or error.")] = "info",
) -> None:
    """Serve a model bundle over gRPC (llmrec.v1.Recommender, health checking and reflection)."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}")
    # Library loggers (grpc, asyncio) stay at INFO or quieter; --log-level debug is for this server's own logs.
    logging.basicConfig(level=max(level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("server").setLevel(level)
    if bundle is None and bundle_root is None:
        _fail("give --bundle-root DIR or --bundle DIR (or set LLMREC_BUNDLE_ROOT / LLMREC_BUNDLE)")
    try:
        settings = ServerSettings(
            bundle=bundle, bundle_root=None if bundle is not None else bundle_root,
            host=host, port=port, max_k=max_k, max_request_history=max_request_history,
            max_text_chars=max_text_chars, intra_op_threads=intra_op_threads, prefer_gpu=prefer_gpu,
            grace_seconds=grace_seconds, max_message_bytes=max_message_mib * MIB,
            max_concurrent_rpcs=max_concurrent_rpcs, session_idle_timeout_s=session_idle_timeout,
        )
        settings.resolve_bundle_dir()  # fail before binding when there is nothing to serve
    except (ValueError, BundleError) as error:
        _fail(str(error))

    from server.app import serve  # imported late: `--help` should not load ONNX Runtime

    try:
        asyncio.run(serve(settings))
    except BundleError as error:
        _fail(f"cannot serve the bundle: {error}")
    except OSError as error:
        _fail(str(error))


def _fail(message: str) -> None:
    typer.echo(f"llmrec-server: {message}", err=True)
    raise typer.Exit(code=2)
