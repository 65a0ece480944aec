"""server.security without a server: the settings it reads (flags, LLMREC_*, TOML), roles, tokens, warnings."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import pytest

from llmrec.v1 import recommender_pb2 as pb
from llmrec.clients.client import _is_local, open_channel
from llmrec.server import security
from llmrec.server.settings import ServerSettings, SettingsError, parse_settings

HASH_A = security.hash_token("token-a")
HASH_B = security.hash_token("token-b")


@pytest.fixture(autouse=True)
def no_llmrec_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("LLMREC_")]:
        monkeypatch.delenv(name)


def test_hash_token_is_sha256_hex():
    assert security.hash_token("abc") == "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_settings_from_environment_variables(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LLMREC_BUNDLE", "b")
    monkeypatch.setenv("LLMREC_TLS_CERT", "/etc/llmrec/tls.crt")
    monkeypatch.setenv("LLMREC_TLS_KEY", "/etc/llmrec/tls.key")
    monkeypatch.setenv("LLMREC_TLS_CLIENT_CA", "/etc/llmrec/clients-ca.crt")
    upper_case_hex = "sha256:" + HASH_B[7:].upper()
    monkeypatch.setenv("LLMREC_AUTH_TOKENS", f"frontend@{HASH_A}=read  ingest@{upper_case_hex}=write,read")
    monkeypatch.setenv("LLMREC_AUTH_MTLS_ROLES", "ops.example.com=admin,read feeder=write")
    settings = parse_settings([])
    assert (settings.tls_cert, settings.tls_key, settings.tls_client_ca) == (
        Path("/etc/llmrec/tls.crt"), Path("/etc/llmrec/tls.key"), Path("/etc/llmrec/clients-ca.crt"))
    assert settings.auth_tokens == (f"frontend@{HASH_A}=read", f"ingest@{HASH_B}=read,write")  # normalised
    assert settings.auth_mtls_roles == {"ops.example.com": ("read", "admin"), "feeder": ("write",)}


def test_settings_from_a_toml_file(tmp_path: Path):
    config = tmp_path / "server.toml"
    config.write_text(f'''bundle = "b"
tls_cert = "tls.crt"
tls_key = "tls.key"
tls_client_ca = "ca.crt"
auth_tokens = ["frontend@{HASH_A}=read", "{HASH_B}=read,write,admin"]

[auth_mtls_roles]
"feeder.internal" = "read,write"
ops = ["admin"]
''')
    settings = parse_settings(["--config", str(config)])
    assert settings.tls_client_ca == Path("ca.crt")
    unnamed = f"token-{HASH_B[7:15]}@{HASH_B}=read,write,admin"  # no NAME@: named after the hash
    assert settings.auth_tokens == (f"frontend@{HASH_A}=read", unnamed)
    assert settings.auth_mtls_roles == {"feeder.internal": ("read", "write"), "ops": ("admin",)}


def test_settings_from_flags_repeated_or_json():
    settings = parse_settings(["--bundle", "b", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca",
                               "--auth-tokens", f"a@{HASH_A}=read,write", "--auth-tokens", f"b@{HASH_B}=admin",
                               "--auth-mtls-roles", "x=read,write", "--auth-mtls-roles", "y=read"])
    assert settings.auth_tokens == (f"a@{HASH_A}=read,write", f"b@{HASH_B}=admin")
    assert settings.auth_mtls_roles == {"x": ("read", "write"), "y": ("read",)}
    settings = parse_settings(["--bundle", "b", "--tls-cert", "c", "--tls-key", "k", "--tls-client-ca", "ca",
                               "--auth-mtls-roles", '{"spiffe://x/a,b": ["read"]}'])
    assert settings.auth_mtls_roles == {"spiffe://x/a,b": ("read",)}
    defaults = ServerSettings(bundle=Path("b"))
    assert defaults.tls_cert is None and defaults.auth_tokens == () and defaults.auth_mtls_roles == {}


@pytest.mark.parametrize("args, message", [
    (["--tls-cert", "c"], "set tls_cert and tls_key together"),
    (["--tls-client-ca", "ca"], "tls_client_ca \\(mutual TLS\\) needs tls_cert and tls_key"),
    (["--auth-mtls-roles", "x=read"], "auth_mtls_roles maps client certificates to roles: it needs tls_client_ca"),
    (["--auth-tokens", "my-raw-token=read"], "store the token's hash, not the token"),
    (["--auth-tokens", f"{HASH_A}=root"], "roles must be some of read, write, admin; unknown 'root'"),
    (["--auth-tokens", f"a@{HASH_A}=read b@{HASH_A}=write"], "the same token digest is listed twice"),
])
def test_bad_security_settings_are_clear_messages(args, message):
    with pytest.raises(SettingsError, match=message):
        parse_settings(["--bundle", "b", *args])


def test_entries_split_on_spaces_semicolons_and_the_commas_of_repeated_flags():
    assert security.split_entries("a=read,write,b=read; c=admin\nd=read write") == [
        "a=read,write", "b=read", "c=admin", "d=read,write"]
    with pytest.raises(ValueError):
        security.split_entries("read a=read")


def test_every_method_has_its_role_and_unlisted_ones_are_admin_only():
    expected = {"Recommend": "read", "RecommendStream": "read", "RecommendBatch": "read", "Session": "read",
                "Embed": "read",
                "GetModelInfo": "read", "GetItem": "read", "ListItems": "read", "UpsertItems": "write",
                "DeleteItems": "write", "ForgetSession": "admin", "LoadModel": "admin"}
    service = pb.DESCRIPTOR.services_by_name["Recommender"]
    for method in service.methods:
        assert security.required_role(f"/{service.full_name}/{method.name}") == expected.get(method.name, "admin")
    assert security.required_role("/llmrec.v1.Recommender/SomeFutureAdminRpc") == "admin"
    assert security.required_role("/grpc.health.v1.Health/Check") is None
    assert security.required_role("/grpc.health.v1.Health/Watch") is None
    assert security.required_role("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo") is None


def test_tokens_are_found_by_their_hash():
    interceptor = security.AuthInterceptor(
        [security.parse_token_entry(f"a@{HASH_A}=read"), security.parse_token_entry(f"{HASH_B}=write")], {})
    assert interceptor._token_identity("token-a") == security.Identity("a", frozenset({"read"}), "token")
    assert interceptor._token_identity("token-b").name == f"token-{HASH_B[7:15]}"
    assert interceptor._token_identity("token-c") is None
    assert security.current_identity() is None  # outside an RPC


def test_no_auth_settings_no_interceptor():
    assert security.AuthInterceptor.from_settings(ServerSettings(bundle=Path("b"))) is None
    assert security.AuthInterceptor.from_settings(
        ServerSettings(bundle=Path("b"), auth_tokens=[f"{HASH_A}=read"])) is not None


def test_an_open_non_loopback_server_is_warned_about(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="llmrec.server.security"):
        security.warn_if_open(ServerSettings(bundle=Path("b"), host="127.0.0.1"))
        security.warn_if_open(ServerSettings(bundle=Path("b"), host="0.0.0.0", auth_tokens=[f"{HASH_A}=read"]))
        assert not caplog.records
        security.warn_if_open(ServerSettings(bundle=Path("b"), host="0.0.0.0"))
    assert "without authorization" in caplog.text
    assert security.is_loopback("::1") and security.is_loopback("localhost") and not security.is_loopback("::")


def test_the_client_warns_before_sending_a_token_in_the_clear():
    assert _is_local("127.0.0.1:50051") and _is_local("[::1]:1") and _is_local("dns:///localhost:2")
    assert _is_local("unix:/run/llmrec.sock") and not _is_local("recs.example.com:443")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_channel("127.0.0.1:1", token="t").close()
        open_channel("recs.example.com:443", token="t", tls=True).close()
    with pytest.warns(UserWarning, match="without TLS"):
        open_channel("recs.example.com:443", token="t").close()
    with pytest.raises(ValueError, match="together"):
        open_channel("127.0.0.1:1", tls_cert="c.pem")


def test_a_raw_token_given_by_mistake_is_not_repeated_in_the_error():
    with pytest.raises(SettingsError) as caught:
        parse_settings(["--bundle", "b", "--auth-tokens", "my-raw-token-1234=read"])
    assert "store the token's hash" in str(caught.value) and "my-raw-token-1234" not in str(caught.value)
