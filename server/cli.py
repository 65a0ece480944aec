"""`llmrec-server`: serve a model bundle over gRPC. Every option can also come from an LLMREC_* variable."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from llmrec.manifest import BundleError

from llmrec.server.settings import MIB, ServerSettings
from llmrec.server.state import StateError

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
    state_dir: Annotated[Path | None, typer.Option(
        envvar="LLMREC_STATE_DIR", help="Directory for durable catalogue changes (journal + snapshots, one "
        "subdirectory per bundle version); without it UpsertItems/DeleteItems are refused.")] = None,
    snapshot_every: Annotated[int, typer.Option(
        envvar="LLMREC_SNAPSHOT_EVERY", help="Catalogue changes between snapshots of the state.")] = 1000,
    max_sessions: Annotated[int, typer.Option(
        envvar="LLMREC_MAX_SESSIONS", help="Live Session streams at once (more: RESOURCE_EXHAUSTED).")] = 1000,
    encoder_workers: Annotated[int, typer.Option(
        envvar="LLMREC_ENCODER_WORKERS", help="Threads running inference; 0 = one per core on CPU, 1 on CUDA.")]
        = 0,
    ort_spinning: Annotated[str, typer.Option(
        envvar="LLMREC_ORT_SPINNING", help="When idle ONNX Runtime threads busy-wait: during-runs (within a run "
        "only), always (ONNX Runtime's default; takes cores from gRPC on small CPUs) or never.")] = "during-runs",
    max_queue: Annotated[int, typer.Option(
        envvar="LLMREC_MAX_QUEUE", help="Requests that may wait for the encoder (more: RESOURCE_EXHAUSTED).")]
        = 128,
    batch_max_requests: Annotated[int, typer.Option(
        envvar="LLMREC_BATCH_MAX_REQUESTS", help="Requests per encoder micro-batch at most.")] = 32,
    batch_max_tokens: Annotated[int, typer.Option(
        envvar="LLMREC_BATCH_MAX_TOKENS", help="Padded tokens per inference run when batching across requests.")]
        = 4096,
    batch_max_delay_ms: Annotated[float, typer.Option(
        envvar="LLMREC_BATCH_MAX_DELAY_MS", help="Wait for more requests when batching across requests.")] = 2.0,
    batch_across_requests: Annotated[bool | None, typer.Option(
        "--batch-across-requests/--no-batch-across-requests", envvar="LLMREC_BATCH_ACROSS_REQUESTS",
        help="Run several requests' texts in one inference run. Default: on CUDA only (on CPU, dynamic INT8 "
        "would make a user's result depend on other traffic).", show_default=False)] = None,
    metrics_port: Annotated[int | None, typer.Option(
        envvar="LLMREC_METRICS_PORT", help="Serve Prometheus metrics on this port (0 = any free port).")] = None,
) -> None:
    """Serve a model bundle over gRPC (llmrec.v1.Recommender, health checking and reflection)."""
    level = logging.getLevelName(log_level.upper())
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}")
    # Library loggers (grpc, asyncio) stay at INFO or quieter; --log-level debug is for this server's own logs.
    logging.basicConfig(level=max(level, logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("llmrec.server").setLevel(level)
    if bundle is None and bundle_root is None:
        _fail("give --bundle-root DIR or --bundle DIR (or set LLMREC_BUNDLE_ROOT / LLMREC_BUNDLE)")
    try:
        settings = ServerSettings(
            bundle=bundle, bundle_root=None if bundle is not None else bundle_root,
            host=host, port=port, max_k=max_k, max_request_history=max_request_history,
            max_text_chars=max_text_chars, intra_op_threads=intra_op_threads, prefer_gpu=prefer_gpu,
            grace_seconds=grace_seconds, max_message_bytes=max_message_mib * MIB,
            max_concurrent_rpcs=max_concurrent_rpcs, session_idle_timeout_s=session_idle_timeout,
            state_dir=state_dir, snapshot_every=snapshot_every, max_sessions=max_sessions,
            encoder_workers=encoder_workers, ort_spinning=ort_spinning, max_queue=max_queue,
            batch_max_requests=batch_max_requests, batch_max_tokens=batch_max_tokens,
            batch_max_delay_ms=batch_max_delay_ms, batch_across_requests=batch_across_requests,
            metrics_port=metrics_port,
        )
        settings.resolve_bundle_dir()  # fail before binding when there is nothing to serve
    except (ValueError, BundleError) as error:
        _fail(str(error))

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
    typer.echo(f"llmrec-server: {message}", err=True)
    raise typer.Exit(code=2)
