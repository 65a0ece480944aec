"""Build and run the grpc.aio server: bind, load the bundle, warm up, serve, swap models, shut down gracefully.

Lifecycle:
1. bind the port with health NOT_SERVING, so orchestrators see the process early but send no traffic;
2. load the bundle and run a warm-up inference for every padded length (in threads: the loop stays live);
3. health SERVING for "" and "llmrec.v1.Recommender"; from now on LoadModel, and polling of bundle_root every
   bundle_poll_seconds, can hot-swap another bundle in without a restart (server.models);
4. on SIGTERM/SIGINT: health NOT_SERVING at once, but everything is still accepted and served for drain_seconds
   (load balancers move traffic away meanwhile; a second signal cuts this short); then no new RPC is accepted, live
   Session streams end with UNAVAILABLE (reason SHUTTING_DOWN, RetryInfo: reconnect elsewhere), in-flight unary
   RPCs get grace_seconds to finish, the catalogue writes its last snapshot; exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from importlib.metadata import version
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmrec.v1 import recommender_pb2 as pb

from llmrec.server import metrics, observability, tracing
from llmrec.server.errors import REASON_SHUTTING_DOWN, Unavailable
from llmrec.server.models import ModelManager
from llmrec.server.recommender import Recommender
from llmrec.server import reflection
from llmrec.server.servicer import RecommenderServicer, add_to_server
from llmrec.server import security
from llmrec.server.settings import ServerSettings

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name  # "llmrec.v1.Recommender"
HEALTH_SERVICES = ("", SERVICE_NAME)
# Once the gRPC server has stopped, how long cancelled handlers get to let go of their model before it is closed.
RELEASE_WAIT_S = 1.0


class RecommenderServer:
    """One server process's gRPC server and model.

    Args:
        settings: what to serve and how.
        tracer_provider: an OpenTelemetry TracerProvider to trace calls with (the caller shuts it down), in place
            of the OTLP exporter that settings.otlp_endpoint asks for.
    """

    def __init__(self, settings: ServerSettings, tracer_provider: Any = None) -> None:
        self.settings = settings
        self._tracer_provider = tracer_provider
        self._tracing: tracing.Tracing | None = None
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self.models = ModelManager(settings)
        self._servicer = RecommenderServicer(settings, self.models)
        self._polling: asyncio.Task | None = None
        self.metrics_port: int | None = None
        self._metrics_http = None
        self.certificates: security.CertificateFiles | None = None  # TLS files, reloaded on change
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING, Recommender UNAVAILABLE). Returns the bound port."""
        limit = self.settings.max_message_bytes
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # gRPC sets SO_REUSEPORT by default: a second server on a busy port would "start" and share it.
            ("grpc.so_reuseport", 0),
        ]
        if self._tracer_provider is not None:
            self._tracing = tracing.Tracing(self._tracer_provider, owned=False)
        elif self.settings.otlp_endpoint is not None:
            self._tracing = tracing.otlp_tracing(self.settings.otlp_endpoint, version("llmrec"))
        # Outermost first: the call's span, then its request id and accounting (refusals included), then auth.
        interceptors: list[grpc.aio.ServerInterceptor] = [] if self._tracing is None else [self._tracing.interceptor()]
        interceptors.append(observability.CallObserver(self._tracing))
        auth = security.AuthInterceptor.from_settings(self.settings)  # None: every caller may call everything
        if auth is not None:
            interceptors.append(auth)
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
                                 interceptors=interceptors)
        self._health = health.aio.HealthServicer()
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        add_to_server(self._servicer, server)  # undecodable requests get INVALID_ARGUMENT (servicer.safe_deserializer)
        # grpc.reflection.v1 and v1alpha both (server.reflection); they add themselves to the list.
        reflection.enable_server_reflection((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name),
                                            server)
        address = f"{self.settings.host}:{self.settings.port}"
        try:
            tls = security.server_credentials(self.settings)  # OSError for unusable certificate files
            if tls is None:
                self.port = server.add_insecure_port(address)
            else:
                credentials, self.certificates = tls
                self.port = server.add_secure_port(address, credentials)
        except RuntimeError as error:  # grpc reports a busy or invalid address this way
            raise OSError(f"cannot listen on {address}: {error}") from error
        if self.settings.metrics:
            metrics_host = self.settings.metrics_host or self.settings.host
            try:
                self._metrics_http, self.metrics_port = metrics.start_metrics_server(metrics_host,
                                                                                     self.settings.metrics_port)
            except OSError as error:
                raise OSError(f"cannot serve metrics on {metrics_host}:{self.settings.metrics_port}: {error} "
                              "(--metrics-port PORT, or --no-metrics)") from error
            logger.info("Prometheus metrics on http://%s:%d/metrics", metrics_host, self.metrics_port)
        if self._tracing is not None:
            logger.info("tracing calls to %s", self.settings.otlp_endpoint or "the given tracer provider")
        await server.start()
        self._server = server
        logger.info("listening on %s:%d, %s (NOT_SERVING until the model is loaded)", self.settings.host, self.port,
                    security.describe(self.settings))
        security.warn_if_open(self.settings)
        return self.port

    @property
    def recommender(self) -> Recommender | None:
        """The model serving new requests (None before the first load and after stop)."""
        current = self.models.slot.current
        return None if current is None else current.recommender

    async def load(self) -> None:
        """Load the bundle, warm up every padded length, then report SERVING; then poll bundle_root if asked.

        Raises:
            BundleError: the bundle cannot be served. StateError: its state directory cannot be used.
        """
        self._loop = asyncio.get_running_loop()
        self.models.on_store_serving = self._store_serving
        generation = await self.models.load_first()
        assert self._health is not None
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("SERVING model %s, index %s (%s, %d inference threads)", generation.model_version,
                    generation.recommender.index_version, generation.recommender.bundle.encoder.provider,
                    self.settings.threads)
        if self.settings.bundle_root is not None and self.settings.bundle_poll_seconds > 0:
            self._polling = asyncio.create_task(self.models.poll(self.settings.bundle_root,
                                                                 self.settings.bundle_poll_seconds))
            logger.info("looking for a newer bundle under %s every %g s", self.settings.bundle_root,
                        self.settings.bundle_poll_seconds)

    def _store_serving(self, serving: bool) -> None:
        """Called from a shared store's thread: NOT_SERVING while this replica may have fallen behind the shared
        catalogue, SERVING once it has caught up (before load() finishes, load() reports SERVING itself)."""
        if self._loop is None or self._health is None or self.recommender is None:
            return
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

        async def report() -> None:  # ignored after enter_graceful_shutdown
            for service in HEALTH_SERVICES:
                await self._health.set(service, status)

        asyncio.run_coroutine_threadsafe(report(), self._loop)

    async def stop(self, grace: float | None = None, drain: float | None = None,
                   cut_short: asyncio.Event | None = None) -> None:
        """Shut down gracefully (the module docstring, step 4).

        Args:
            grace: seconds in-flight unary RPCs get once no new RPC is accepted (default: settings.grace_seconds).
            drain: seconds to keep accepting and serving with health NOT_SERVING first (settings.drain_seconds).
            cut_short: set (by a second signal) to end the drain period early.
        """
        grace = self.settings.grace_seconds if grace is None else grace
        drain = self.settings.drain_seconds if drain is None else drain
        if self._health is not None:
            await self._health.enter_graceful_shutdown()  # NOT_SERVING now, whatever happens next
        self.models.refuse_swaps()
        if self._polling is not None:
            self._polling.cancel()
            await asyncio.gather(self._polling, return_exceptions=True)
        if self._server is not None and drain > 0 and self.models.slot.current is not None:
            logger.info("draining: health NOT_SERVING, still serving for %g s", drain)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for((cut_short or asyncio.Event()).wait(), drain)
        if self._server is not None:
            logger.info("stopping: no new RPCs; %g s grace for in-flight ones; live sessions end (UNAVAILABLE)",
                        grace)
            stopping = asyncio.create_task(self._server.stop(grace))
            await asyncio.sleep(0)  # stop() has begun refusing new RPCs: a session ended now cannot reopen here
            ended = self._servicer.sessions.end_all(Unavailable(
                "the server is shutting down: reconnect and open the session again (another replica will answer)",
                reason=REASON_SHUTTING_DOWN, retry_after_s=0.0))
            if ended:
                logger.info("ended %d live sessions", ended)
            await stopping
        # Pending catalogue writes finish, a last snapshot, the state directory is released, encoders stop.
        await self.models.stop(timeout_s=RELEASE_WAIT_S)
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()
            self._metrics_http = None
        if self._tracing is not None:  # the last spans go out (an OTLP exporter waits up to its timeout)
            await asyncio.to_thread(self._tracing.shutdown)
            self._tracing = None
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve(settings: ServerSettings, handle_signals: bool = True) -> None:
    """Run a server until SIGTERM/SIGINT (or until the task is cancelled).

    Raises:
        BundleError: the bundle cannot be served (the port is released before this propagates).
        OSError: the address cannot be bound.
    """
    server = RecommenderServer(settings)
    stop = asyncio.Event()
    again = asyncio.Event()  # a second signal: end the drain period now

    def on_signal() -> None:
        (again if stop.is_set() else stop).set()

    if handle_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, on_signal)
    await server.start()
    loading = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    try:
        # A signal during loading must still stop the process promptly.
        done, _ = await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading in done:
            loading.result()  # a BundleError propagates from here
            await stopping
        logger.info("shutdown requested")
    finally:
        for task in (loading, stopping):
            task.cancel()
        await asyncio.gather(loading, stopping, return_exceptions=True)
        await server.stop(cut_short=again)
