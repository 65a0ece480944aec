"""Servers for integration tests: the real grpc.aio server on its own event loop in a background thread."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from llmrec import manifest as mf
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from llmrec.server.app import RecommenderServer
from llmrec.server.settings import ServerSettings


@dataclasses.dataclass
class BackgroundServer:
    """A RecommenderServer running on a private event loop, driven from the (synchronous) test thread."""

    settings: ServerSettings
    tracer_provider: Any = None  # an OpenTelemetry TracerProvider to trace calls with (RecommenderServer)
    loop: asyncio.AbstractEventLoop = dataclasses.field(default_factory=asyncio.new_event_loop)
    server: RecommenderServer | None = None
    port: int = 0

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self.loop.run_forever, name="test-server-loop", daemon=True)
        self._thread.start()

    def run(self, coroutine, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self, load: bool = True) -> BackgroundServer:
        async def create() -> RecommenderServer:  # the server's asyncio objects must be made on its loop
            return RecommenderServer(self.settings, tracer_provider=self.tracer_provider)

        self.server = self.run(create())
        self.port = self.run(self.server.start())
        if load:
            self.load()
        return self

    def load(self) -> None:
        assert self.server is not None
        self.run(self.server.load())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.loop.is_closed():  # closed already (a test may stop a server early, e.g. to restart it)
            return
        if self.server is not None:
            self.run(self.server.stop(grace=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


def settings_for(bundle: Path, **overrides) -> ServerSettings:
    """Test settings: any free port for gRPC and for metrics (many servers run side by side)."""
    return ServerSettings(bundle=bundle, host="127.0.0.1", **{"port": 0, "metrics_port": 0, "prefer_gpu": False,
                                                               **overrides})


@pytest.fixture(scope="session")
def server(tiny_bundle: Path) -> Iterator[BackgroundServer]:
    """One loaded server with default limits, shared by the session's tests."""
    running = BackgroundServer(settings_for(tiny_bundle)).start()
    yield running
    running.close()


@pytest.fixture
def serve_bundle() -> Iterator[Callable[..., BackgroundServer]]:
    """Factory for a private server of any bundle: serve_bundle(bundle, state_dir=tmp_path)."""
    started: list[BackgroundServer] = []

    def start(bundle: Path, load: bool = True, **overrides) -> BackgroundServer:
        running = BackgroundServer(settings_for(bundle, **overrides))
        started.append(running)
        return running.start(load=load)

    yield start
    for running in started:
        running.close()


@pytest.fixture
def start_server(tiny_bundle: Path, serve_bundle) -> Callable[..., BackgroundServer]:
    """Factory for a private server with other settings: start_server(load=False, session_idle_timeout_s=1)."""
    return lambda load=True, **overrides: serve_bundle(tiny_bundle, load, **overrides)


@pytest.fixture(scope="module")
def state_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BackgroundServer]:
    """A loaded server with a state directory (catalogue changes allowed), one per test module."""
    running = BackgroundServer(settings_for(tiny_bundle, state_dir=tmp_path_factory.mktemp("state"),
                                            snapshot_every=4)).start()
    yield running
    running.close()


@pytest.fixture(scope="session")
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as open_channel:
        yield open_channel


@pytest.fixture(scope="session")
def stub(channel: grpc.Channel) -> pb_grpc.RecommenderStub:
    return pb_grpc.RecommenderStub(channel)


@pytest.fixture
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Callable[..., Path]:
    """Factory for a cheap variant of the tiny bundle: bundle_copy(copy=(files...), **manifest_changes).

    Files are symlinks to the tiny bundle except the manifest, its digest and those in `copy`, which are real
    copies (so a test may alter them); manifest_changes are written into the copied manifest, and its digest
    (manifest.sha256) is rewritten to match.
    """
    made = 0

    def make(copy: tuple[str, ...] = (), **manifest_changes) -> Path:
        nonlocal made
        made += 1
        target = tmp_path / f"copy{made}" / tiny_bundle.name
        for relative in (*mf.BUNDLE_FILES, mf.MANIFEST_FILE, mf.MANIFEST_DIGEST_FILE):
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if relative in (mf.MANIFEST_FILE, mf.MANIFEST_DIGEST_FILE) or relative in copy:
                destination.write_bytes((tiny_bundle / relative).read_bytes())
            else:
                destination.symlink_to(tiny_bundle / relative)
        if manifest_changes:
            path = target / mf.MANIFEST_FILE
            path.write_text(json.dumps({**json.loads(path.read_text()), **manifest_changes}))
            mf.write_manifest_digest(target)  # a deliberate change: re-hash it, as export would
        return target

    return make
