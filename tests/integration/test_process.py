"""`llmrec-server` as a real process: the Makefile's invocation, graceful SIGTERM, private logs, bad input."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from typer.testing import CliRunner

from llmrec.clients.client import RecommenderClient, RecommenderError
from llmrec.clients.status_details import details_of
from llmrec.v1 import recommender_pb2 as pb
from llmrec.v1 import recommender_pb2_grpc as pb_grpc
from llmrec.server.cli import app as server_app
from llmrec.server.errors import REASON_SHUTTING_DOWN

REPO = Path(__file__).parents[2]
SECRET_QUERY = "zanzibar-private-query"
SECRET_TITLE = "Xyzzy Private Title"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_sigterm_stops_the_server_cleanly_and_logs_stay_private(tiny_bundle: Path, tmp_path: Path):
    port = free_port()
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            # The Makefile's form: the newest bundle under a root.
            [sys.executable, "-m", "llmrec.server", "--bundle-root", str(tiny_bundle.parent), "--host", "127.0.0.1",
             "--port", str(port), "--metrics-port", "0", "--log-level", "debug", "--cpu-only",
             "--state-dir", str(tmp_path / "state")],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        with RecommenderClient(f"127.0.0.1:{port}", timeout_s=10) as client:
            client.wait_until_serving(timeout_s=90)
            result = client.recommend(["m1", {"title": SECRET_TITLE}], query=SECRET_QUERY, k=3)
            assert len(result.items) == 3
            # The newer RPCs log no history, query, explanation or item text either.
            explained = client.recommend(["m1", {"title": SECRET_TITLE}], query=SECRET_QUERY, k=3, explain=True)
            assert SECRET_TITLE in {r.text for i in explained.items for r in i.explanation.reasons}
            with client.session() as live:
                assert live.configure(k=2, explain=True, history=[{"title": SECRET_TITLE}]).ok
                assert live.query(SECRET_QUERY).ok
                client.forget_session(live.session_id)
            client.upsert_items([{"id": "secret-item", "title": SECRET_TITLE, "attributes": {"note": SECRET_QUERY}}])
            assert client.get_item("secret-item").title == SECRET_TITLE
            client.list_items()
            client.delete_items(["secret-item"])
            assert client.model_info().model_version == tiny_bundle.name
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "SERVING model" in log and "Recommend OK" in log and "stopped" in log
    assert "UpsertItems OK" in log and "ForgetSession OK" in log and "Session ABORTED" in log
    assert "Traceback" not in log
    assert SECRET_QUERY not in log and SECRET_TITLE not in log
    # JSON lines by default; a call's lines carry its request id.
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert any(r["message"].startswith("SERVING model") for r in records)
    assert any(r["message"].startswith("Recommend OK") and r["rpc_method"] == "Recommend" and r["request_id"]
               for r in records)


def test_sigterm_drains_first_then_ends_sessions_with_a_retryable_status(tiny_bundle: Path, tmp_path: Path):
    port = free_port()
    target = f"127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        # A drain period far longer than the test: the second SIGTERM below ends it, so nothing here races a clock.
        process = subprocess.Popen(
            [sys.executable, "-m", "llmrec.server", "--bundle", str(tiny_bundle), "--port", str(port), "--cpu-only",
             "--drain-seconds", "600", "--grace-seconds", "5"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
    try:
        with RecommenderClient(target, timeout_s=10) as client, grpc.insecure_channel(target) as channel:
            client.wait_until_serving(timeout_s=90)
            events: queue.Queue = queue.Queue()
            session = pb_grpc.RecommenderStub(channel).Session(iter(events.get, None), timeout=120)
            events.put(pb.SessionRequest(event_id="1", query="space adventure"))
            assert next(session).status.code == 0

            process.send_signal(signal.SIGTERM)
            while client.health() != "NOT_SERVING":  # load balancers are told at once ...
                time.sleep(0.05)
            # ... but while the drain period lasts, everything is still accepted and served.
            assert len(client.recommend(["m1"], k=3).items) == 3
            events.put(pb.SessionRequest(event_id="2", query="robots"))
            assert next(session).status.code == 0
            with client.session() as fresh:
                assert fresh.query("comedy").ok
            assert client.health() == "NOT_SERVING" and process.poll() is None

            process.send_signal(signal.SIGTERM)  # a second signal ends the drain period now
            with pytest.raises(grpc.RpcError) as ended:
                next(session)
            assert ended.value.code() == grpc.StatusCode.UNAVAILABLE and "reconnect" in ended.value.details()
            details = details_of(ended.value)
            assert details.reason == REASON_SHUTTING_DOWN and details.retry_after_s is not None
            assert RecommenderError.from_rpc_error(ended.value).retryable
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "draining" in log and "ended 1 live sessions" in log and "stopped" in log and "Traceback" not in log


def test_server_cli_refuses_a_missing_bundle_root(tmp_path: Path):
    result = CliRunner().invoke(server_app, ["--bundle-root", str(tmp_path / "nothing"), "--port", "0"])
    assert result.exit_code == 2
    assert "does not exist" in result.stderr


def test_server_cli_refuses_an_empty_bundle_root(tmp_path: Path):
    result = CliRunner().invoke(server_app, ["--bundle-root", str(tmp_path), "--port", "0"])
    assert result.exit_code == 2
    assert "no bundle under" in result.stderr


def test_server_cli_needs_a_bundle(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("LLMREC_BUNDLE_ROOT", raising=False)
    monkeypatch.delenv("LLMREC_BUNDLE", raising=False)
    result = CliRunner().invoke(server_app, ["--port", "0"])
    assert result.exit_code == 2 and "--bundle-root" in result.stderr


def test_server_cli_refuses_a_bundle_for_another_template(bundle_copy):
    stale = bundle_copy(template_version="0")
    result = CliRunner().invoke(server_app, ["--bundle", str(stale), "--port", "0", "--cpu-only"])
    assert result.exit_code == 2
    assert "cannot serve the bundle" in result.stderr and "template version '0'" in result.stderr
