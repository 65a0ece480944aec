"""Build and run the grpc.aio server: bind, load the bundle, warm up, serve, shut down gracefully.

Lifecycle:
1. bind the port with health NOT_SERVING, so orchestrators see the process early but send no traffic;
2. load the bundle and run a warm-up inference for every padded length (in threads: the loop stays live);
3. health SERVING for "" and "llmrec.v1.Recommender";
4. on SIGTERM/SIGINT: NOT_SERVING, then server.stop(grace) lets in-flight RPCs finish; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from llmrec.v1 import recommender_pb2 as pb

from llmrec.server import metrics
from llmrec.server.bundle import LoadedBundle
from llmrec.server.catalogue import open_catalogue
from llmrec.server.encoding import AsyncEncoder, BatchPolicy
from llmrec.server.recommender import Recommender
from llmrec.server import reflection
from llmrec.server.servicer import RecommenderServicer, add_to_server
from llmrec.server import security
from llmrec.server.settings import ServerSettings
from llmrec.server.validation import Limits

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name  # "llmrec.v1.Recommender"
HEALTH_SERVICES = ("", SERVICE_NAME)


class RecommenderServer:
    """One server process's gRPC server and model.

    Args:
        settings: what to serve and how.
    """

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.port: int | None = None
        self.recommender: Recommender | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._servicer = RecommenderServicer(settings)
        self._encoder: AsyncEncoder | None = None
        self.metrics_port: int | None = None
        self._metrics_http = None
        self.certificates: security.CertificateFiles | None = None  # TLS files, reloaded on change

    async def start(self) -> int:
        """Bind and start answering (health NOT_SERVING, Recommender UNAVAILABLE). Returns the bound port."""
        limit = self.settings.max_message_bytes
        options = [
            ("grpc.max_send_message_length", limit),
            ("grpc.max_receive_message_length", limit),
            # gRPC sets SO_REUSEPORT by default: a second server on a busy port would "start" and share it.
            ("grpc.so_reuseport", 0),
        ]
        auth = security.AuthInterceptor.from_settings(self.settings)  # None: every caller may call everything
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=self.settings.max_concurrent_rpcs,
                                 interceptors=None if auth is None else [auth])
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
        if self.settings.metrics_port is not None:
            try:
                self._metrics_http, self.metrics_port = metrics.start_metrics_server(self.settings.host,
                                                                                     self.settings.metrics_port)
            except OSError as error:
                raise OSError(f"cannot serve metrics on port {self.settings.metrics_port}: {error}") from error
            logger.info("Prometheus metrics on http://%s:%d/metrics", self.settings.host, self.metrics_port)
        await server.start()
        self._server = server
        logger.info("listening on %s:%d, %s (NOT_SERVING until the model is loaded)", self.settings.host, self.port,
                    security.describe(self.settings))
        security.warn_if_open(self.settings)
        return self.port

    async def load(self) -> None:
        """Load the bundle, warm up every padded length, then report SERVING.

        Raises:
            BundleError: the bundle cannot be served.
        """
        settings = self.settings
        bundle_dir = settings.resolve_bundle_dir()
        logger.info("loading bundle %s", bundle_dir)
        bundle = await asyncio.to_thread(
            LoadedBundle.load, bundle_dir, prefer_gpu=settings.prefer_gpu,
            intra_op_threads=settings.intra_op_threads, min_ef=settings.max_k, verify_hashes=settings.verify_hashes,
            spinning=settings.ort_spinning,
        )
        manifest = bundle.manifest
        workers = settings.encoder_workers or (1 if bundle.precision == "fp32" else settings.threads)
        self._encoder = await asyncio.to_thread(  # may load a second session (the parallel lane): off the loop
            AsyncEncoder, bundle.encoder, manifest.max_user_tokens, manifest.max_item_tokens, workers,
            batch_policy(settings))
        logger.info("encoder: %d workers, %s", workers, "batching across requests" if self._encoder.across_requests
                    else "one run per text (a request alone on all cores, concurrent ones one core each)")
        widths = await self._encoder.warm_up()
        logger.info("warmed up widths %s", widths)
        limits = Limits(settings.max_k, settings.max_request_history, settings.max_text_chars)
        catalogue = await asyncio.to_thread(open_catalogue, bundle, settings.state_dir, settings.snapshot_every,
                                            settings.cold_start_map)
        self.recommender = Recommender(bundle, self._encoder, limits, catalogue, settings.new_item_share)
        metrics.time_calls(self.recommender, "search", metrics.INDEX_SECONDS)
        self._servicer.attach(self.recommender)
        assert self._health is not None
        for service in HEALTH_SERVICES:
            await self._health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("SERVING model %s, index %s (%s, %d inference threads)", self.recommender.model_version,
                    self.recommender.index_version, bundle.encoder.provider, settings.threads)

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first (load balancers drain), then let in-flight RPCs finish for up to `grace` seconds."""
        grace = self.settings.grace_seconds if grace is None else grace
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._server is not None:
            logger.info("stopping: %g s grace for in-flight RPCs", grace)
            await self._server.stop(grace)
        self._servicer.attach(None)
        if self.recommender is not None:  # pending catalogue writes finish, a last snapshot, the lock released
            await asyncio.to_thread(self.recommender.catalogue.close)
        if self._encoder is not None:
            await asyncio.to_thread(self._encoder.close)
        if self._metrics_http is not None:
            await asyncio.to_thread(self._metrics_http.shutdown)
            self._metrics_http.server_close()
            self._metrics_http = None
        logger.info("stopped")

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()


def batch_policy(settings: ServerSettings) -> BatchPolicy:
    """The encoder's queueing and batching policy from the settings (server.encoding)."""
    return BatchPolicy(
        across_requests=settings.batch_across_requests, max_requests=settings.batch_max_requests,
        max_tokens=settings.batch_max_tokens, max_delay_s=settings.batch_max_delay_ms / 1e3,
        max_queue=settings.max_queue,
    )


async def serve(settings: ServerSettings, handle_signals: bool = True) -> None:
    """Run a server until SIGTERM/SIGINT (or until the task is cancelled).

    Raises:
        BundleError: the bundle cannot be served (the port is released before this propagates).
        OSError: the address cannot be bound.
    """
    server = RecommenderServer(settings)
    stop = asyncio.Event()
    if handle_signals:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
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
        await server.stop()
