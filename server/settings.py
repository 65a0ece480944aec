"""Server settings: one typed model, read from code, flags, LLMREC_* variables or a TOML file.

ServerSettings built in code takes its keywords and defaults only, so tests never pick up a developer's
environment or command line. parse_settings() reads what `llmrec-server` is told, strongest first: flags,
LLMREC_* environment variables, the TOML file named by --config (LLMREC_CONFIG), defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    CliApp,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from llmrec.manifest import BundleError, latest_bundle

MIB = 1 << 20
ENV_PREFIX = "LLMREC_"

Port = Annotated[int, Field(ge=0, le=65535)]
Positive = Annotated[int, Field(ge=1)]


class ServerSettings(BaseSettings):
    """Everything the server can be told. Exactly one of bundle and bundle_root must be set."""

    model_config = SettingsConfigDict(
        frozen=True,
        extra="forbid",
        env_prefix=ENV_PREFIX,
        env_prefix_target="all",  # alias names (LLMREC_SESSION_IDLE_TIMEOUT) take the prefix too
        cli_prog_name="llmrec-server",
        cli_kebab_case=True,
        cli_implicit_flags=True,  # booleans get --flag and --no-flag
        cli_hide_none_type=True,
        cli_show_env_vars=True,
    )

    bundle: Path | None = Field(None, description=(
        "Serve exactly this bundle directory. On the command line it wins over a bundle_root from the same or a "
        "weaker source (flags > LLMREC_* > --config)."))
    bundle_root: Path | None = Field(None, description=(
        "Serve the newest complete bundle under this directory (llmrec.manifest.latest_bundle), and swap in a "
        "newer one without a restart when one appears there (bundle_poll_seconds)."))
    bundle_poll_seconds: float = Field(30.0, ge=0, description=(
        "How often, in seconds, to look under bundle_root for a new newest bundle and hot-swap to it (load, "
        "verify, warm up, carry catalogue changes over, swap); 0 = never (LoadModel still can). Ignored with "
        "bundle."))
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 for all).")
    port: Port = Field(50051, description=(
        "TCP port; 0 lets the OS pick a free one (the bound port is logged and returned by start())."))
    max_k: Positive = Field(100, description="The largest k a request may ask for.")
    max_request_history: Positive = Field(500, description=(
        "The most history items one request (or one session) may carry."))
    max_text_chars: Positive = Field(2000, description=(
        "The longest any single text field (title, category, query, ...) may be, in characters."))
    max_embed_inputs: Positive = Field(256, description="The most items plus users one Embed call may carry.")
    intra_op_threads: int = Field(0, ge=0, description=(
        "ONNX Runtime threads per inference; 0 means the cores this process may use."))
    encoder_workers: int = Field(0, ge=0, description=(
        "Threads that run inference; 0 = auto: one per core on CPU (a request alone uses every core, concurrent "
        "ones run side by side, one core each; server.encoding), 1 on CUDA."))
    # Declared before prefer_gpu: its validator reads this one.
    cpu_only: bool = Field(False, description=(
        "Never use a GPU: the same as --no-prefer-gpu, kept for existing scripts. Wins over --prefer-gpu."))
    prefer_gpu: bool = Field(True, validate_default=True, description=(
        "Serve the FP32 model on CUDA when a GPU is present (the INT8 model on CPU otherwise)."))
    drain_seconds: float = Field(0.0, ge=0, description=(
        "After SIGTERM/SIGINT, how long the server keeps accepting and serving with health NOT_SERVING, so that "
        "load balancers move traffic away first, in seconds (a second signal cuts it short). Then grace_seconds."))
    grace_seconds: float = Field(5.0, ge=0, description=(
        "Once the drain period is over and no new RPC is accepted, how long in-flight unary RPCs may run on, in "
        "seconds (live Session streams end at once with UNAVAILABLE: reconnect elsewhere)."))
    max_message_mib: Positive = Field(16, description=(
        "gRPC send and receive limit in MiB, set explicitly rather than trusting gRPC's defaults."))
    max_concurrent_rpcs: Positive | None = Field(None, description=(
        "RPCs admitted at once (further ones get RESOURCE_EXHAUSTED); unset = no cap."))
    session_idle_timeout_s: float = Field(
        300.0, gt=0, validation_alias=AliasChoices("session_idle_timeout_s", "session_idle_timeout"),
        description="Seconds a Session stream may go without an event before it is closed (DEADLINE_EXCEEDED).")
    default_page_size: Positive = Field(10, description="RecommendStream page size when the request says 0.")
    default_session_k: Positive = Field(10, description=(
        "k for a Session until a config event sets one; at most max_k."))
    verify_hashes: bool = Field(True, description=(
        "Check every bundle file's sha256 against the manifest at load time."))
    state_dir: Path | None = Field(None, description=(
        "Where catalogue changes are journaled and snapshotted (server.state; one subdirectory per bundle "
        "version). Unset = the catalogue is read-only: UpsertItems/DeleteItems get FAILED_PRECONDITION."))
    snapshot_every: Positive = Field(1000, description=(
        "Catalogue changes between snapshots (each snapshot empties the journal)."))
    catalogue_store: Literal["local", "postgres"] = Field("local", description=(
        "Where catalogue changes are made durable: local = the journal in state_dir, owned by this one server; "
        "postgres = one PostgreSQL database shared by many replicas, each applying every change in order "
        "(server.store; needs postgres_dsn or postgres_dsn_file, and the psycopg package of the server extra)."))
    postgres_dsn: str | None = Field(None, description=(
        "libpq connection string or URI of the shared catalogue database, e.g. postgresql://llmrec@db/llmrec "
        "(LLMREC_POSTGRES_DSN, e.g. from a Kubernetes Secret). Never logged."))
    postgres_dsn_file: Path | None = Field(None, description=(
        "A file holding postgres_dsn (a mounted Kubernetes Secret); read at start-up."))
    postgres_connect_timeout_s: float = Field(60.0, gt=0, description=(
        "How long start-up keeps trying to reach the catalogue database before the server exits (code 2)."))
    postgres_apply_timeout_s: float = Field(30.0, gt=0, description=(
        "How long a committed change may take to be applied on this replica before its call gets UNAVAILABLE "
        "(it stays committed, and is applied once this replica catches up)."))
    cold_start_map: bool = Field(True, description=(
        "Give upserted items the id vector and bias the bundle's cold-start map predicts from their text "
        "(docs/model.md); --no-cold-start-map: their text vector and the bundle's new_item_bias alone. Applies to "
        "items upserted while it is set (stored rows are replayed as they were)."))
    new_item_cooccurrence: float = Field(1.0, ge=0, description=(
        "How much of their nearest trained items' co-occurrence new (upserted) items borrow (llmrec.cooccurrence."
        "Borrowers): 1 = as much as those items would get, 0 = none (new items then have no co-occurrence score, and "
        "applying an upsert searches for no donors)."))
    new_item_boost: float = Field(0.0, ge=0, description=(
        "Added to every new (upserted) item's score, on the score's own scale, so that new items compete with "
        "trained ones that have co-occurrence counts and a learned bias (llmrec.scoring); `make eval-cold` "
        "chooses it on validation (docs/results.md#cold-items). 0 = none."))
    new_item_share: float = Field(0.0, ge=0, le=1, description=(
        "Share of every list reserved for new (upserted) items when a request does not set new_item_share: "
        "floor(share * k) of the k go to the best-scoring new items if the model ranks fewer there. 0 = none."))
    ranking_stage: bool = Field(False, description=(
        "Re-score the first stage's best candidates with the model's cross-encoder when a request does not set "
        "ranking_stage (llmrec.ranking_stage; ~170 ms a request for 20 candidates on 2 CPU cores). Models without one "
        "serve without it."))
    max_sessions: Positive = Field(1000, description=(
        "Live Session streams at once, server-wide (more get RESOURCE_EXHAUSTED)."))
    # Fair sharing between clients (server.fairness: who a client is, and why half).
    max_sessions_per_client: Positive | None = Field(None, description=(
        "Live Session streams one client may hold at once (more get RESOURCE_EXHAUSTED); unset = half of "
        "max_sessions, so one client can never take every slot."))
    max_inflight_per_client: Positive | None = Field(None, description=(
        "Encoder-using RPCs (Recommend, RecommendStream, RecommendBatch, Embed, UpsertItems) one client may have "
        "in flight (more get RESOURCE_EXHAUSTED at once; Session events wait instead); unset = half of max_queue."))
    max_recommend_batch: Positive = Field(100, description="The most requests one RecommendBatch call may carry.")
    ort_spinning: Literal["during-runs", "always", "never"] = Field("during-runs", description=(
        "When idle ONNX Runtime threads busy-wait: during-runs (between the parallel sections of a run, never "
        "between runs), always (ONNX Runtime's default: also between runs, taking the cores gRPC and Python "
        "need) or never (llmrec.onnx_encoder.SPINNING; measured in docs/benchmarks.md)."))
    encoder_path: Literal["auto", "always"] = Field("auto", description=(
        "auto: a Recommend or Session request whose history is all catalogue ids, with no query and no items given "
        "as text, is served without the encoder when the bundle has fast-path adjustments (the fast path: "
        "docs/serving.md); always: every request runs the encoder (the full path)."))
    max_queue: Positive = Field(128, description=(
        "Requests that may wait for the encoder; one more gets RESOURCE_EXHAUSTED at once."))
    batch_max_requests: Positive = Field(32, description="Requests one encoder micro-batch takes at most.")
    batch_max_tokens: Positive = Field(4096, description=(
        "Padded tokens one ONNX Runtime run holds at most when batching across requests."))
    batch_max_delay_ms: float = Field(2.0, ge=0, description=(
        "How long a worker waits for more requests when batching across requests, in milliseconds."))
    batch_across_requests: bool | None = Field(None, description=(
        "Run several requests' texts in one inference run; unset = on CUDA (FP32) only, because on CPU dynamic "
        "INT8 would make one user's vector depend on other traffic (server.encoding)."))
    # Observability (docs/serving.md#observability).
    metrics: bool = Field(True, description=(
        "Serve Prometheus metrics at http://METRICS_HOST:METRICS_PORT/metrics; --no-metrics (LLMREC_METRICS=false) "
        "turns the endpoint off."))
    metrics_host: str | None = Field(None, description=(
        "Interface the metrics endpoint listens on; unset = the same as host."))
    metrics_port: Port = Field(9090, description=(
        "Port of the metrics endpoint; 0 = any free one (logged). Servers sharing a machine need one each."))
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description=(
        "This server's log level; library loggers (grpc, asyncio) stay at info or quieter."))
    log_format: Literal["json", "text"] = Field("json", description=(
        "json: one JSON object per line (time, level, logger, message, and request_id and rpc_method during a "
        "call; trace_id and span_id when traced); text: one readable line each, the request id in brackets "
        "(`make serve` uses text)."))
    otlp_endpoint: str | None = Field(None, description=(
        "Send OpenTelemetry traces over OTLP/gRPC to this collector, e.g. http://otel-collector:4317 (https:// for "
        "TLS); unset = no tracing, and OpenTelemetry is not even imported. The standard OTEL_* variables "
        "(OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER, OTEL_EXPORTER_OTLP_HEADERS, ...) apply."))
    # Transport security and authorization (server.security).
    tls_cert: Path | None = Field(None, description=(
        "PEM certificate chain to serve TLS with (with tls_key); unset = plaintext. Reloaded without a restart "
        "when the file changes: new connections get the new certificate."))
    tls_key: Path | None = Field(None, description="The unencrypted PEM private key of tls_cert, reloaded with it.")
    tls_client_ca: Path | None = Field(None, description=(
        "PEM CA bundle: when set, every client must present a certificate it signed (mutual TLS)."))
    auth_tokens: Annotated[tuple[str, ...], NoDecode] = Field((), description=(
        "Bearer tokens that may call, stored as their SHA-256: entries NAME@sha256:HEX=ROLES (roles read, write, "
        "admin joined by commas; NAME@ optional) separated by spaces, or a TOML list of them. python -m "
        "llmrec.server.security new-token makes one. Unset together with auth_mtls_roles = no authorization."))
    auth_mtls_roles: Annotated[dict[str, tuple[str, ...]], NoDecode] = Field({}, description=(
        "Client certificate identities (subject CN or a SAN) and their roles: entries IDENTITY=ROLES separated "
        "by spaces, or a TOML table identity = \"read,write\". Needs tls_client_ca."))

    @field_validator("auth_tokens", mode="before")
    @classmethod
    def _token_entries(cls, value: Any) -> tuple[str, ...]:
        from llmrec.server.security import normalise_tokens  # grpc loads only when tokens are configured

        return normalise_tokens(value)

    @field_validator("auth_mtls_roles", mode="before")
    @classmethod
    def _certificate_roles(cls, value: Any) -> dict[str, tuple[str, ...]]:
        from llmrec.server.security import normalise_certificate_roles

        return normalise_certificate_roles(value)

    @model_validator(mode="after")
    def _security_consistent(self) -> ServerSettings:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set tls_cert and tls_key together (--tls-cert FILE --tls-key FILE)")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca (mutual TLS) needs tls_cert and tls_key")
        if self.auth_mtls_roles and self.tls_client_ca is None:
            raise ValueError("auth_mtls_roles maps client certificates to roles: it needs tls_client_ca")
        return self

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keywords only: settings built in code say everything they mean."""
        return (init_settings,)

    @field_validator("prefer_gpu")
    @classmethod
    def _cpu_only_wins(cls, prefer_gpu: bool, info: ValidationInfo) -> bool:
        return prefer_gpu and not info.data.get("cpu_only", False)

    @field_validator("otlp_endpoint")
    @classmethod
    def _collector_url(cls, endpoint: str | None) -> str | None:
        if endpoint is None:
            return None
        url = urlsplit(endpoint)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("must be a URL like http://otel-collector:4317 (https:// for TLS)")
        return endpoint

    @field_validator("log_level", "log_format", mode="before")
    @classmethod
    def _lower_case(cls, level: Any) -> Any:
        return level.lower() if isinstance(level, str) else level

    @model_validator(mode="after")
    def _store_consistent(self) -> ServerSettings:
        given = (self.postgres_dsn is not None) + (self.postgres_dsn_file is not None)
        if self.catalogue_store == "postgres" and given != 1:
            raise ValueError("catalogue_store postgres needs exactly one of postgres_dsn (--postgres-dsn, "
                             f"{ENV_PREFIX}POSTGRES_DSN) and postgres_dsn_file (--postgres-dsn-file)")
        if self.catalogue_store == "local" and given:
            raise ValueError("postgres_dsn / postgres_dsn_file are read only with catalogue_store postgres "
                             "(--catalogue-store postgres)")
        return self

    def read_postgres_dsn(self) -> str:
        """The shared store's connection string (postgres_dsn, or postgres_dsn_file's content, stripped)."""
        if self.postgres_dsn is not None:
            return self.postgres_dsn
        assert self.postgres_dsn_file is not None
        try:
            return Path(self.postgres_dsn_file).read_text().strip()
        except OSError as error:
            raise OSError(f"cannot read postgres_dsn_file {self.postgres_dsn_file}: {error}") from None

    @model_validator(mode="after")
    def _consistent(self) -> ServerSettings:
        if (self.bundle is None) == (self.bundle_root is None):
            raise ValueError("set exactly one of --bundle-root DIR and --bundle DIR "
                             f"(or {ENV_PREFIX}BUNDLE_ROOT / {ENV_PREFIX}BUNDLE, or bundle_root / bundle in --config)")
        if self.default_session_k > self.max_k:
            raise ValueError(f"default_session_k ({self.default_session_k}) must not exceed max_k ({self.max_k})")
        return self

    @property
    def max_message_bytes(self) -> int:
        """The gRPC message limit in bytes."""
        return self.max_message_mib * MIB

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


class CommandLineSettings(ServerSettings):
    """Serve a model bundle over gRPC. Each setting comes from its flag, else LLMREC_*, else the --config file."""

    config: Path | None = Field(None, description=(
        "TOML file of settings, keyed by field name (max_k = 50); flags and LLMREC_* variables override it."))

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   **_: PydanticBaseSettingsSource) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (added by CliApp, strongest), then the environment, then the config file."""
        return (init_settings, _WeakerSource(settings_cls, lambda _: env_settings()),
                _WeakerSource(settings_cls, _read_config_file))

    @model_validator(mode="before")
    @classmethod
    def _bundle_beats_bundle_root(cls, data: Any) -> Any:
        # Both are left only when one source names both (stronger sources already won in _WeakerSource): as
        # `llmrec-server` always did, the pinned bundle wins over the root it would otherwise search.
        if isinstance(data, dict) and data.get("bundle") is not None:
            return {key: value for key, value in data.items() if key != "bundle_root"}
        return data


class _WeakerSource(PydanticBaseSettingsSource):
    """A source below the flags whose bundle choice counts only when no stronger source made one.

    bundle and bundle_root are one choice made two ways: without this, a bundle in the config file would beat
    --bundle-root on the command line (CommandLineSettings lets bundle win when both are left).
    """

    def __init__(self, settings_cls: type[BaseSettings], read: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
        super().__init__(settings_cls)
        self._read = read

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # not used: __call__ reads the whole source at once

    def __call__(self) -> dict[str, Any]:
        values = self._read(self.current_state)
        if self.current_state.keys() & {"bundle", "bundle_root"}:
            return {key: value for key, value in values.items() if key not in ("bundle", "bundle_root")}
        return values


def _read_config_file(stronger: dict[str, Any]) -> dict[str, Any]:
    """The TOML file that the flags or the environment name as config, or nothing."""
    path = stronger.get("config")
    if path is None:
        return {}
    if not Path(path).is_file():
        raise SettingsError(f"config file {path} does not exist")
    try:
        return TomlConfigSettingsSource(CommandLineSettings, toml_file=Path(path))()
    except ValueError as error:  # tomllib.TOMLDecodeError
        raise SettingsError(f"config file {path}: {error}") from None


def parse_settings(args: Sequence[str] | None = None) -> CommandLineSettings:
    """Settings from flags (`args`, default sys.argv[1:]), LLMREC_* variables and the config file.

    Raises:
        SettingsError: a bad or contradictory value, one line per problem naming its flag and variable.
        SystemExit: --help, or arguments argparse cannot parse (an unknown flag, a flag without its value).
    """
    try:
        return CliApp.run(CommandLineSettings, cli_args=None if args is None else list(args))
    except ValidationError as error:
        raise SettingsError("\n".join(_explain(problem) for problem in error.errors())) from None


SECRET_SETTINGS = frozenset({"auth_tokens", "postgres_dsn"})


def _explain(problem: Any) -> str:
    """One validation problem as `name (--flag, LLMREC_VAR): message (got value)`."""
    message = str(problem["ctx"]["error"]) if problem["type"] == "value_error" else problem["msg"]
    if not problem["loc"]:
        return message
    name = str(problem["loc"][0])
    if problem["type"] == "extra_forbidden":  # only a config file can name a setting that does not exist
        return f"unknown setting {name!r} in the config file"
    where = f"{name} (--{name.replace('_', '-')}, {ENV_PREFIX}{name.upper()}): {message}"
    # a mistyped token entry may hold the raw token: an error that goes to logs must not repeat it
    return where if name in SECRET_SETTINGS else f"{where} (got {problem['input']!r})"
