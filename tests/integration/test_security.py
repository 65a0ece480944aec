"""TLS, mutual TLS, certificate reload, bearer tokens and roles, against the real server (server.security).

Certificates are made here with `cryptography` (tls_certs): one CA for the server and the clients alice (SAN
alice.clients.test), bob and carol, and a rogue CA that the server does not trust.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import socket
import ssl
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from typer.testing import CliRunner

from llmrec.v1 import recommender_pb2 as pb
from llmrec.clients.cli import app as cli_app
from llmrec.clients.client import RecommenderClient, RecommenderError
from llmrec.server import security
from llmrec.server.servicer import RecommenderServicer

from tls_certs import CertificateAuthority, make_pki

# The conftest's server helper, for module-scoped servers (its fixtures are function- or session-scoped).
_spec = importlib.util.spec_from_file_location("_integration_conftest", Path(__file__).with_name("conftest.py"))
_conftest = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(_conftest)
BackgroundServer, settings_for = _conftest.BackgroundServer, _conftest.settings_for

TOKENS = {name: secrets.token_urlsafe(32) for name in ("reader", "writer", "admin")}
ROLES = {"reader": "read", "writer": "read,write", "admin": "admin"}
ENTRIES = tuple(f"{name}@{security.hash_token(TOKENS[name])}={ROLES[name]}" for name in TOKENS)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return make_pki(tmp_path_factory.mktemp("pki"), {"alice": ["alice.clients.test"], "bob": [], "carol": []})


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(CA, client cert, client key) from a CA the servers do not trust."""
    directory = tmp_path_factory.mktemp("rogue")
    authority = CertificateAuthority("rogue CA")
    cert, key = authority.issue("alice", dns=["alice.clients.test"], client=True).write(directory, "mallory")
    return authority.write(directory), cert, key


@pytest.fixture(scope="module")
def token_server(tiny_bundle, pki, tmp_path_factory):
    """TLS, bearer tokens reader (read), writer (read,write), admin (admin); a writable catalogue."""
    running = BackgroundServer(settings_for(
        tiny_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key, auth_tokens=ENTRIES,
        state_dir=tmp_path_factory.mktemp("state"))).start()
    yield running
    running.close()


@pytest.fixture(scope="module")
def mtls_server(tiny_bundle, pki, tmp_path_factory):
    """Mutual TLS; alice (by SAN) may read and write, bob (by CN) may read; the admin token works too."""
    running = BackgroundServer(settings_for(
        tiny_bundle, tls_cert=pki.server_cert, tls_key=pki.server_key, tls_client_ca=pki.ca,
        auth_mtls_roles={"alice.clients.test": "read,write", "bob": "read"},
        auth_tokens=(f"admin@{security.hash_token(TOKENS['admin'])}=admin",),
        state_dir=tmp_path_factory.mktemp("state"))).start()
    yield running
    running.close()


def client(server, pki, token: str | None = None, who: str | None = None, timeout_s: float = 10) -> RecommenderClient:
    """A TLS client trusting the test CA, with client `who`'s certificate and a token when given."""
    cert, key = pki.clients[who] if who else (None, None)
    return RecommenderClient(server.target, timeout_s=timeout_s, tls_ca=pki.ca, tls_cert=cert, tls_key=key,
                             token=token)


def failure(call, *args, **kwargs) -> RecommenderError:
    with pytest.raises(RecommenderError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- TLS and mutual TLS -------------------------------------------------------------------------------------


def test_tls_answers_and_plaintext_is_refused(token_server, pki, rogue):
    with client(token_server, pki) as secure:
        assert secure.health() == "SERVING"
    with RecommenderClient(token_server.target, timeout_s=3) as plaintext:
        assert failure(plaintext.health).code == grpc.StatusCode.UNAVAILABLE
    with RecommenderClient(token_server.target, timeout_s=3, tls_ca=rogue[0]) as distrusting:  # wrong CA
        assert failure(distrusting.health).code == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_client_ca(mtls_server, pki, rogue):
    with client(mtls_server, pki, timeout_s=3) as anonymous:
        assert failure(anonymous.health).code == grpc.StatusCode.UNAVAILABLE  # the handshake fails
    with RecommenderClient(mtls_server.target, timeout_s=3, tls_ca=pki.ca, tls_cert=rogue[1],
                           tls_key=rogue[2]) as impostor:  # alice's names, the wrong CA
        assert failure(impostor.health).code == grpc.StatusCode.UNAVAILABLE
    with client(mtls_server, pki, who="carol") as known:
        assert known.health() == "SERVING"


def test_the_server_refuses_to_start_with_a_key_that_is_not_the_certificates(start_server, pki):
    with pytest.raises(OSError, match="not a PEM certificate and its unencrypted key"):
        start_server(load=False, tls_cert=pki.server_cert, tls_key=pki.clients["alice"][1])


# --- tokens and roles ------------------------------------------------------------------------------------


def test_missing_unknown_and_malformed_credentials_are_unauthenticated(token_server, pki):
    with client(token_server, pki) as anonymous:
        error = failure(anonymous.recommend, ["m1"])
        assert error.code == grpc.StatusCode.UNAUTHENTICATED and "missing bearer token" in error.message
    with client(token_server, pki, token="not-a-token") as stranger:
        error = failure(stranger.model_info)
        assert error.code == grpc.StatusCode.UNAUTHENTICATED and error.message == "unknown token"
    with client(token_server, pki) as raw:
        with pytest.raises(grpc.RpcError) as caught:
            raw.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=[("authorization", "Basic eDp5")])
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in caught.value.details()


def test_streams_are_checked_when_they_start(token_server, pki):
    with client(token_server, pki) as anonymous:
        assert failure(lambda: list(anonymous.recommend_stream(["m1"]))).code == grpc.StatusCode.UNAUTHENTICATED
        with anonymous.session(timeout_s=10) as live:
            assert failure(live.configure, k=3).code == grpc.StatusCode.UNAUTHENTICATED
    with client(token_server, pki, token=TOKENS["reader"]) as reader:
        assert [len(page.items) for page in reader.recommend_stream(["m1"], k=4, page_size=2)] == [2, 2]
        with reader.session(timeout_s=10) as live:
            assert live.configure(k=3).ok and len(live.interact("m2").items) == 3


def test_a_read_token_reads_but_cannot_write_or_administer(token_server, pki):
    with client(token_server, pki, token=TOKENS["reader"]) as reader:
        assert len(reader.recommend(["m1"], k=3).items) == 3
        assert reader.get_item("m1").item_id == "m1" and reader.list_items(5).items
        assert reader.model_info().model_version and len(reader.embed(items=["Alien (1979)"]).items) == 1
        for call, args in ((reader.upsert_items, [{"id": "x1", "title": "X"}]), (reader.delete_items, ["m1"])):
            error = failure(call, args)
            assert error.code == grpc.StatusCode.PERMISSION_DENIED and "needs the 'write' role" in error.message
        for call, args in ((reader.forget_session, "s"), (reader.load_model, "")):
            error = failure(call, args)
            assert error.code == grpc.StatusCode.PERMISSION_DENIED and "needs the 'admin' role" in error.message
            assert "reader has read" in error.message
        assert reader.get_item("m1").item_id == "m1"  # nothing was deleted


def test_a_write_token_changes_the_catalogue(token_server, pki):
    with client(token_server, pki, token=TOKENS["writer"]) as writer:
        change = writer.upsert_items([{"id": "sec-1", "title": "Arrival (2016)", "categories": ["Sci-Fi"]}])
        assert (change.created, change.replaced) == (1, 0)
        assert writer.get_item("sec-1").title == "Arrival (2016)"
        assert writer.delete_items(["sec-1"]).deleted == 1
        assert failure(writer.forget_session, "s").code == grpc.StatusCode.PERMISSION_DENIED
        assert failure(writer.load_model, "").code == grpc.StatusCode.PERMISSION_DENIED


def test_an_admin_token_ends_another_callers_session_and_roles_do_not_imply_each_other(token_server, pki,
                                                                                       tiny_bundle):
    with client(token_server, pki, token=TOKENS["reader"]) as reader, reader.session(timeout_s=10) as live:
        session_id = live.configure(k=3).session_id
        with client(token_server, pki, token=TOKENS["admin"]) as admin:
            assert not admin.load_model(str(tiny_bundle)).swapped  # the served bundle: allowed, nothing to do
            admin.forget_session(session_id)
            error = failure(admin.recommend, ["m1"])
            assert error.code == grpc.StatusCode.PERMISSION_DENIED and "needs the 'read' role" in error.message
        assert failure(live.interact, "m2").code == grpc.StatusCode.ABORTED  # the reader's session ended


def test_health_and_reflection_need_no_credentials(token_server, pki):
    with client(token_server, pki) as anonymous:
        assert anonymous.health() == "SERVING" and anonymous.health("llmrec.v1.Recommender") == "SERVING"
        stub = reflection_pb2_grpc.ServerReflectionStub(anonymous.channel)
        answers = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                            timeout=10)
        names = {service.name for answer in answers for service in answer.list_services_response.service}
        assert "llmrec.v1.Recommender" in names


def test_certificate_identities_map_to_roles_and_a_token_decides_when_sent(mtls_server, pki):
    with client(mtls_server, pki, who="alice") as alice:  # mapped by its SAN
        assert alice.upsert_items([{"id": "sec-2", "title": "Heat (1995)"}]).created == 1
        assert alice.delete_items(["sec-2"]).deleted == 1
    with client(mtls_server, pki, who="bob") as bob:  # mapped by its CN
        assert len(bob.recommend(["m1"], k=2).items) == 2
        error = failure(bob.upsert_items, [{"id": "sec-3", "title": "Ran (1985)"}])
        assert error.code == grpc.StatusCode.PERMISSION_DENIED and "bob has read" in error.message
    with client(mtls_server, pki, who="carol") as carol:  # signed by the CA, mapped to nothing
        error = failure(carol.recommend, ["m1"])
        assert error.code == grpc.StatusCode.UNAUTHENTICATED and "carol" in error.message
    with client(mtls_server, pki, who="bob", token=TOKENS["admin"]) as bob_as_admin:
        assert failure(bob_as_admin.forget_session, "no-such-session").code == grpc.StatusCode.NOT_FOUND


def test_a_token_over_plaintext_loopback_reaches_the_server_and_the_servicer_sees_the_caller(
        start_server, monkeypatch):
    seen = []
    original = RecommenderServicer.GetModelInfo

    async def recording(self, request, context):
        seen.append(security.current_identity())
        return await original(self, request, context)

    monkeypatch.setattr(RecommenderServicer, "GetModelInfo", recording)
    plain = start_server(load=False, auth_tokens=ENTRIES)  # the model is not loaded: UNAVAILABLE once let in
    with RecommenderClient(plain.target, timeout_s=10, token=TOKENS["reader"]) as reader:
        assert failure(reader.model_info).code == grpc.StatusCode.UNAVAILABLE  # authorized, then not ready
        assert reader.health() == "NOT_SERVING"
    with RecommenderClient(plain.target, timeout_s=10) as anonymous:
        assert failure(anonymous.model_info).code == grpc.StatusCode.UNAUTHENTICATED
    assert seen == [security.Identity("reader", frozenset({"read"}), "token")]


def test_the_cli_passes_the_connection_options(token_server, pki, monkeypatch):
    runner = CliRunner()
    args = ["info", "--target", token_server.target, "--json"]
    result = runner.invoke(cli_app, ["--tls-ca", str(pki.ca), "--token", TOKENS["reader"], *args])
    assert result.exit_code == 0, result.output
    assert '"model_version"' in result.stdout
    denied = runner.invoke(cli_app, ["--tls-ca", str(pki.ca), *args])
    assert denied.exit_code != 0 and "UNAUTHENTICATED" in denied.output
    monkeypatch.setenv("LLMREC_TLS_CA", str(pki.ca))
    monkeypatch.setenv("LLMREC_TOKEN", TOKENS["writer"])
    result = runner.invoke(cli_app, ["upsert", "--target", token_server.target, "--id", "sec-4", "--title", "Up"])
    assert result.exit_code == 0 and "created 1" in result.stdout, result.output


# --- certificate reload ----------------------------------------------------------------------------------


def presented_certificate(port: int) -> bytes:
    """The DER certificate a new TLS connection to the port is shown (no verification: whatever it is)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True)


def replace(path: Path, content: bytes) -> None:
    """Write beside, then rename over: how certificates should be rotated."""
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(content)
    os.replace(staged, path)


def test_certificates_are_reloaded_without_a_restart(start_server, tmp_path, caplog):
    old_ca, new_ca = CertificateAuthority("first CA"), CertificateAuthority("second CA")
    old_ca_file, new_ca_file = old_ca.write(tmp_path, "old-ca"), new_ca.write(tmp_path, "new-ca")
    first = old_ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
    cert, key = first.write(tmp_path, "server")
    running = start_server(load=False, tls_cert=cert, tls_key=key)
    assert presented_certificate(running.port) == first.der
    with RecommenderClient(running.target, timeout_s=5, tls_ca=old_ca_file) as before:
        assert before.health() == "NOT_SERVING"  # a connection opened before the rotation

        second = new_ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
        with caplog.at_level(logging.WARNING, logger="llmrec.server.security"):
            replace(cert, second.cert_pem)  # half rotated: the new certificate, the old key
            assert presented_certificate(running.port) == first.der  # the unmatched pair is not used
        assert "cannot be used yet" in caplog.text
        replace(key, second.key_pem)
        assert presented_certificate(running.port) == second.der
        assert running.server.certificates.reloads == 1

        with RecommenderClient(running.target, timeout_s=5, tls_ca=new_ca_file) as after:
            assert after.health() == "NOT_SERVING"
        with RecommenderClient(running.target, timeout_s=3, tls_ca=old_ca_file) as stale:
            assert failure(stale.health).code == grpc.StatusCode.UNAVAILABLE  # new connections: new certificate
        assert before.health() == "NOT_SERVING"  # the server stayed up, the old connection with it
