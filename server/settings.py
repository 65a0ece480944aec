"""Server settings: one typed object built by the CLI (or by tests) and read everywhere else."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from llmrec.manifest import BundleError, latest_bundle

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Everything the server can be told. Exactly one of `bundle` and `bundle_root` must be set.

    Attributes:
        bundle: serve this exact bundle directory.
        bundle_root: serve the newest bundle under this directory (llmrec.manifest.latest_bundle).
        host: interface to listen on.
        port: TCP port; 0 lets the OS pick one (the bound port is logged and returned by start()).
        max_k: the largest k a request may ask for.
        max_request_history: the most history items one request (or one session) may carry.
        max_text_chars: the longest any single text field (title, category, query, ...) may be.
        max_embed_inputs: the most items plus users one Embed call may carry.
        intra_op_threads: ONNX Runtime threads per inference; 0 means the cores this process may use.
        encoder_workers: threads that run inference; 0 = auto: one per core on CPU (a request alone uses every
            core, concurrent ones run side by side, one core each; server.encoding), 1 on CUDA.
        prefer_gpu: serve the FP32 model on CUDA when a GPU is present (INT8 on CPU otherwise).
        grace_seconds: how long in-flight RPCs may run on after SIGTERM/SIGINT.
        max_message_bytes: gRPC send and receive limit, set explicitly rather than trusting defaults.
        max_concurrent_rpcs: RPCs admitted at once (further ones get RESOURCE_EXHAUSTED); None = no cap.
        session_idle_timeout_s: a Session stream with no event for this long is closed (DEADLINE_EXCEEDED).
        default_page_size: RecommendStream page size when the request says 0.
        default_session_k: k for a Session until a config event sets one.
        verify_hashes: check every bundle file's sha256 against the manifest at load time.
        state_dir: where catalogue changes are journaled and snapshotted (server.state); None = the catalogue
            is read-only (UpsertItems/DeleteItems get FAILED_PRECONDITION).
        snapshot_every: catalogue changes between snapshots (each snapshot empties the journal).
        max_sessions: live Session streams at once, server-wide (more get RESOURCE_EXHAUSTED).
        ort_spinning: when idle ONNX Runtime threads busy-wait: "during-runs" (between the parallel sections of
            a run, never between runs), "always" (ONNX Runtime's default: also between runs, taking the cores
            gRPC and Python need) or "never" (llmrec.onnx_encoder.SPINNING; measured: README "Benchmarks").
        max_queue: requests that may wait for the encoder; one more gets RESOURCE_EXHAUSTED at once.
        batch_max_requests: requests one encoder micro-batch takes at most.
        batch_max_tokens: padded tokens one ONNX Runtime run holds at most when batching across requests.
        batch_max_delay_ms: how long a worker waits for more requests when batching across requests.
        batch_across_requests: run several requests' texts in one run; None = on CUDA (FP32) only. On CPU
            dynamic INT8 would make one user's vector depend on other traffic (server.encoding).
        metrics_port: serve Prometheus metrics on this port (0 = any free one); None = no metrics server.
    """

    bundle: Path | None = None
    bundle_root: Path | None = None
    host: str = "127.0.0.1"
    port: int = 50051
    max_k: int = 100
    max_request_history: int = 500
    max_text_chars: int = 2000
    max_embed_inputs: int = 256
    intra_op_threads: int = 0
    encoder_workers: int = 0
    prefer_gpu: bool = True
    grace_seconds: float = 5.0
    max_message_bytes: int = 16 * MIB
    max_concurrent_rpcs: int | None = None
    session_idle_timeout_s: float = 300.0
    default_page_size: int = 10
    default_session_k: int = 10
    verify_hashes: bool = True
    state_dir: Path | None = None
    snapshot_every: int = 1000
    max_sessions: int = 1000
    ort_spinning: str = "during-runs"
    max_queue: int = 128
    batch_max_requests: int = 32
    batch_max_tokens: int = 4096
    batch_max_delay_ms: float = 2.0
    batch_across_requests: bool | None = None
    metrics_port: int | None = None

    def __post_init__(self) -> None:
        if (self.bundle is None) == (self.bundle_root is None):
            raise ValueError("set exactly one of bundle and bundle_root")
        for name in ("max_k", "max_request_history", "max_text_chars", "max_embed_inputs",
                     "max_message_bytes", "default_page_size", "default_session_k", "snapshot_every", "max_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be 0..65535, got {self.port}")
        if self.intra_op_threads < 0 or self.grace_seconds < 0 or self.session_idle_timeout_s <= 0:
            raise ValueError("intra_op_threads and grace_seconds must be >= 0, session_idle_timeout_s > 0")
        if self.encoder_workers < 0:
            raise ValueError(f"encoder_workers must be >= 0 (0 = auto), got {self.encoder_workers}")
        for name in ("max_queue", "batch_max_requests", "batch_max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.ort_spinning not in ("during-runs", "always", "never"):
            raise ValueError(f"ort_spinning must be during-runs, always or never, got {self.ort_spinning!r}")
        if self.batch_max_delay_ms < 0:
            raise ValueError("batch_max_delay_ms must be >= 0")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be 0..65535, got {self.metrics_port}")
        if self.default_session_k > self.max_k:
            raise ValueError("default_session_k must not exceed max_k")

    @property
    def threads(self) -> int:
        """ONNX Runtime intra-op threads actually used (0 resolved to the cores available)."""
        return self.intra_op_threads or len(os.sched_getaffinity(0))

    def resolve_bundle_dir(self) -> Path:
        """The bundle directory to serve; raises BundleError when bundle_root holds none."""
        if self.bundle is not None:
            return Path(self.bundle)
        assert self.bundle_root is not None
        if not Path(self.bundle_root).is_dir():
            raise BundleError(f"bundle root {self.bundle_root} does not exist; run `make export` first")
        return latest_bundle(Path(self.bundle_root))
