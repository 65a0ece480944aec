"""Transport security and authorization: TLS (reloaded without a restart), mutual TLS, bearer tokens, roles.

TLS (settings tls_cert, tls_key, tls_client_ca):
    server_credentials() builds grpc.dynamic_ssl_server_credentials. Before each new TLS handshake gRPC asks
    CertificateFiles.fetch() for the certificate; it re-reads the PEM files when the mtime, size or inode of
    any of them changed, checks that the certificate and key belong together (and that the CA parses), and
    only then hands gRPC the new configuration. Connections already open keep the certificate they were
    made with; new ones get the new one; the server never restarts. Rotate by writing the new files and
    renaming them over the old ones (a half-written pair is kept out: it fails the check, a warning is logged
    and the previous certificate stays in use until the pair is whole). tls_client_ca set = mutual TLS: every
    client must present a certificate that CA signed (the CA file is reloaded the same way).

Roles (METHOD_ROLES): read (Recommend, RecommendStream, RecommendBatch, Session, Embed, GetModelInfo, GetItem,
    ListItems), write (UpsertItems, DeleteItems), admin (ForgetSession, LoadModel and every Recommender method not
    listed, so an RPC added later is admin-only until someone says otherwise). Roles do not imply each other: a
    catalogue feeder that also reads needs "read,write". grpc.health.v1.Health and server reflection are public:
    orchestrators probe health without credentials, and reflection only describes the (public) API.

Credentials (AuthInterceptor; on when auth_tokens or auth_mtls_roles is set, otherwise every caller may call
everything, as before, and a server on a non-loopback address logs a warning):
    * bearer token: `authorization: Bearer <token>` metadata. Settings hold only the token's SHA-256
      (auth_tokens entries "[NAME@]sha256:HEX=ROLE[,ROLE]"; `python -m llmrec.server.security new-token`
      makes a token and its entry). Tokens are random 256-bit secrets, not passwords, so an unsalted fast
      hash is enough: nobody can guess a preimage, and a leaked config does not leak tokens. The presented
      token is hashed and compared with every configured hash with hmac.compare_digest.
    * client certificate (mutual TLS): the certificate's subject CN, then each subject alternative name, in
      that order; the first that auth_mtls_roles names gives the identity and its roles.
    A token, when sent, decides (a certificate is then only transport security). No known token and no mapped
    certificate -> UNAUTHENTICATED ("missing bearer token", "unknown token"); a known identity without the
    method's role -> PERMISSION_DENIED naming the role. Every method is checked when the call starts (streams
    too: a Session or RecommendStream is refused before its first message).

The servicer (and anything it calls) reads the caller with current_identity(): an Identity(name, roles,
source) during an authenticated call, None when authorization is off or for public methods.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import hashlib
import hmac
import inspect
import ipaddress
import json
import logging
import os
import re
import secrets
import ssl
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import grpc

if TYPE_CHECKING:
    from llmrec.server.settings import ServerSettings

logger = logging.getLogger(__name__)

ROLES = ("read", "write", "admin")
SERVICE = "llmrec.v1.Recommender"
METHOD_ROLES: dict[str, str] = {
    **{f"/{SERVICE}/{name}": "read" for name in (
        "Recommend", "RecommendStream", "RecommendBatch", "Session", "Embed", "GetModelInfo", "GetItem",
        "ListItems")},
    **{f"/{SERVICE}/{name}": "write" for name in ("UpsertItems", "DeleteItems")},
    **{f"/{SERVICE}/{name}": "admin" for name in ("ForgetSession", "LoadModel")},
}
DEFAULT_ROLE = "admin"  # any method not in METHOD_ROLES
PUBLIC_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                   "/grpc.reflection.v1.ServerReflection/")

_TOKEN_ENTRY = re.compile(r"(?:(?P<name>[^@\s=,;]+)@)?sha256:(?P<digest>[0-9a-fA-F]{64})=(?P<roles>[^=]*)")
_BEARER = re.compile(r"bearer\s+(?P<token>\S+)\s*", re.IGNORECASE)


def required_role(method: str) -> str | None:
    """The role a full method name ("/llmrec.v1.Recommender/Recommend") needs; None for public methods."""
    if method.startswith(PUBLIC_PREFIXES):
        return None
    return METHOD_ROLES.get(method, DEFAULT_ROLE)


# --- identities and the settings' grammar --------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Identity:
    """An authenticated caller. name: the token's name (or "token-<first 8 hex of its hash>") or the
    certificate CN/SAN that auth_mtls_roles maps."""

    name: str
    roles: frozenset[str]
    source: Literal["token", "certificate"]


_IDENTITY: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("llmrec_identity", default=None)


def current_identity() -> Identity | None:
    """The caller of the RPC being served (for per-client limits, audit logs); None when auth is off."""
    return _IDENTITY.get()


@dataclasses.dataclass(frozen=True)
class TokenGrant:
    """One auth_tokens entry: a token's SHA-256 and the roles it grants."""

    name: str
    digest: bytes
    roles: frozenset[str]

    def entry(self) -> str:
        return f"{self.name}@sha256:{self.digest.hex()}={','.join(sorted_roles(self.roles))}"


def hash_token(token: str) -> str:
    """The form auth_tokens holds a token in: "sha256:" and the hex SHA-256 of the token."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def sorted_roles(roles: Iterable[str]) -> list[str]:
    return sorted(roles, key=ROLES.index)


def parse_roles(value: str | Iterable[str], owner: str) -> frozenset[str]:
    """The role set "read,write" (or ["read", "write"]) names; ValueError naming `owner` for a bad one."""
    names = value.replace("+", ",").split(",") if isinstance(value, str) else list(value)
    roles = frozenset(str(name).strip().lower() for name in names if str(name).strip())
    unknown = sorted(roles - set(ROLES))
    if unknown or not roles:
        got = f"unknown {', '.join(map(repr, unknown))}" if unknown else "none given"
        raise ValueError(f"{owner}: roles must be some of {', '.join(ROLES)}; {got}")
    return roles


def parse_token_entry(entry: str) -> TokenGrant:
    """One entry, [NAME@]sha256:HEX=ROLE[,ROLE], as a TokenGrant (NAME defaults to "token-<first 8 hex>")."""
    match = _TOKEN_ENTRY.fullmatch(entry.strip())
    if match is None:
        raise ValueError(f"auth token entry {_redact(entry)!r} is not [NAME@]sha256:<64 hex>=ROLE[,ROLE] "
                         "(store the token's hash, not the token: python -m llmrec.server.security hash-token)")
    digest = bytes.fromhex(match["digest"])
    name = match["name"] or f"token-{digest.hex()[:8]}"
    return TokenGrant(name, digest, parse_roles(match["roles"], f"auth token {name}"))


def _redact(entry: str) -> str:
    return entry if len(entry) <= 20 else entry[:12] + "..."


def split_entries(value: str) -> list[str]:
    """A flag's or variable's text -> "KEY=ROLES" entries.

    Entries are separated by whitespace, ';' or ',' (the command line joins a repeated flag's values with
    ','); a piece without '=' is one more role of the entry before it: "a=read,write b=read" is two entries.
    """
    entries: list[str] = []
    for piece in re.split(r"[\s,;]+", value.strip()):
        if not piece:
            continue
        if "=" in piece:
            entries.append(piece)
        elif entries:
            entries[-1] += "," + piece
        else:
            raise ValueError(f"{piece!r} is not NAME=ROLE[,ROLE]")
    return entries


def _decode(value: Any) -> Any:
    """A string from a flag or variable: JSON when it looks like JSON, else the plain-text entry list."""
    if isinstance(value, str):
        text = value.strip()
        return json.loads(text) if text.startswith(("[", "{")) else split_entries(text)
    return value


def normalise_tokens(value: Any) -> tuple[str, ...]:
    """auth_tokens from any source (a TOML list, a JSON list, "entry entry ...") -> normalised entries."""
    grants = [parse_token_entry(str(entry)) for entry in _decode(value) or ()]
    for seen, key in ((set(), "name"), (set(), "digest")):
        for grant in grants:
            if getattr(grant, key) in seen:
                raise ValueError(f"auth token {grant.name}: the same token {key} is listed twice")
            seen.add(getattr(grant, key))
    return tuple(grant.entry() for grant in grants)


def normalise_certificate_roles(value: Any) -> dict[str, tuple[str, ...]]:
    """auth_mtls_roles from any source (a TOML table, JSON, "identity=roles ...") -> {identity: roles}."""
    value = _decode(value) or {}
    if isinstance(value, list):
        value = dict(entry.rsplit("=", 1) for entry in value)
    if not isinstance(value, Mapping):
        raise ValueError("expected identity = roles pairs")
    return {str(identity): tuple(sorted_roles(parse_roles(roles, f"certificate identity {identity}")))
            for identity, roles in value.items()}


# --- the interceptor ------------------------------------------------------------------------------------


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks each call's credentials against the role its method needs (see the module docstring)."""

    def __init__(self, tokens: Sequence[TokenGrant], certificate_roles: Mapping[str, Iterable[str]]) -> None:
        self._tokens = tuple(tokens)
        self._certificates = {identity: frozenset(roles) for identity, roles in certificate_roles.items()}
        self._guarded: dict[str, Any] = {}  # method -> its guarded handler (the server's handlers never change)

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> AuthInterceptor | None:
        """The interceptor the settings ask for; None when neither auth_tokens nor auth_mtls_roles is set."""
        if not settings.auth_tokens and not settings.auth_mtls_roles:
            return None
        return cls([parse_token_entry(entry) for entry in settings.auth_tokens], settings.auth_mtls_roles)

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
                                handler_call_details: grpc.HandlerCallDetails) -> Any:
        method = handler_call_details.method
        guarded = self._guarded.get(method)
        if guarded is not None:
            return guarded
        handler = await continuation(handler_call_details)
        role = required_role(method)
        if handler is None or role is None:
            return handler
        guarded = self._guarded[method] = _guarded(handler, functools.partial(self._authorize, method, role))
        return guarded

    def _token_identity(self, token: str) -> Identity | None:
        digest = hashlib.sha256(token.encode()).digest()
        found = None
        for grant in self._tokens:  # every entry compared, whichever matches: no timing hint
            if hmac.compare_digest(digest, grant.digest) and found is None:
                found = grant
        return None if found is None else Identity(found.name, found.roles, "token")

    def _certificate_identity(self, context: grpc.aio.ServicerContext) -> tuple[Identity | None, list[str]]:
        """The mapped identity of the client certificate, and every name the certificate carries."""
        if not self._certificates:
            return None, []
        auth = context.auth_context()
        names = [value.decode(errors="replace") for key in ("x509_common_name", "x509_subject_alternative_name")
                 for value in auth.get(key, ())]
        for name in names:
            if name in self._certificates:
                return Identity(name, self._certificates[name], "certificate"), names
        return None, names

    async def _authorize(self, method: str, role: str, context: grpc.aio.ServicerContext) -> None:
        """Sets current_identity() when the caller may call `method`; aborts the call otherwise."""
        identity = header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value
        if header is not None:
            match = _BEARER.fullmatch(header)
            if match is None:
                await _deny(context, grpc.StatusCode.UNAUTHENTICATED, method,
                            "the authorization metadata must be 'Bearer <token>'")
            identity = self._token_identity(match["token"])
            if identity is None:
                await _deny(context, grpc.StatusCode.UNAUTHENTICATED, method, "unknown token")
        else:
            identity, names = self._certificate_identity(context)
            if identity is None:
                message = "missing bearer token: send 'authorization: Bearer <token>' metadata"
                if names:
                    message += f" (the client certificate {', '.join(names)} is not mapped to roles)"
                elif self._certificates:
                    message += " or a client certificate mapped to roles"
                await _deny(context, grpc.StatusCode.UNAUTHENTICATED, method, message)
        assert identity is not None
        if role not in identity.roles:
            await _deny(context, grpc.StatusCode.PERMISSION_DENIED, method,
                        f"{method.rsplit('/', 1)[-1]} needs the '{role}' role; {identity.name} has "
                        f"{', '.join(sorted_roles(identity.roles))}")
        # Each RPC runs in its own copy of the context: the identity never leaks into another call.
        _IDENTITY.set(identity)


async def _deny(context: grpc.aio.ServicerContext, code: grpc.StatusCode, method: str, message: str) -> None:
    logger.info("%s %s from %s: %s", method, code.name, context.peer(), message)
    await context.abort(code, message)


def _guarded(handler: Any, authorize: Callable[[Any], Awaitable[None]]) -> Any:
    """The same handler with `authorize(context)` run first, in the call's own task."""
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _check_then_await(handler.unary_unary, authorize), handler.request_deserializer,
            handler.response_serializer)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _check_then_await(handler.stream_unary, authorize), handler.request_deserializer,
            handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _check_then_stream(handler.unary_stream, authorize), handler.request_deserializer,
            handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(
        _check_then_stream(handler.stream_stream, authorize), handler.request_deserializer,
        handler.response_serializer)


def _check_then_await(behaviour: Callable, authorize: Callable[[Any], Awaitable[None]]) -> Callable:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await authorize(context)
        return await behaviour(request, context)

    return guarded


def _check_then_stream(behaviour: Callable, authorize: Callable[[Any], Awaitable[None]]) -> Callable:
    if not inspect.isasyncgenfunction(behaviour):  # a coroutine that writes with context.write()
        return _check_then_await(behaviour, authorize)

    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await authorize(context)
        async for response in behaviour(request, context):
            yield response

    return guarded


# --- TLS ------------------------------------------------------------------------------------------------


class CertificateFiles:
    """The server's PEM files, re-read for the next handshake whenever one of them changes.

    Args:
        cert: certificate chain (the server's certificate first).
        key: its private key (unencrypted).
        client_ca: CA bundle that client certificates must chain to; None = no client certificates.
    """

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = Path(cert), Path(key), None if client_ca is None else Path(client_ca)
        self.reloads = 0
        self._stamp: tuple | None = None
        self._rejected: tuple | None = None
        self._lock = threading.Lock()

    @property
    def paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) if self.client_ca is None else (self.cert, self.key, self.client_ca)

    def _stamps(self) -> tuple:
        stamps = []
        for path in self.paths:
            try:
                status = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
        return tuple(stamps)

    def load(self) -> grpc.ServerCertificateConfiguration:
        """Read and check the files now.

        Raises:
            OSError: a file is missing or unreadable, the certificate and key do not match, a PEM file does not
                parse, or the files changed while they were read (read them again).
        """
        before = self._stamps()
        contents = []
        for path in self.paths:
            try:
                contents.append(path.read_bytes())
            except OSError as error:
                raise OSError(f"cannot read {path}: {error.strerror or error}") from None
        try:
            server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            server.load_cert_chain(self.cert, self.key, password=_no_password)
        except (ssl.SSLError, ValueError) as error:
            raise OSError(f"{self.cert} and {self.key} are not a PEM certificate and its unencrypted key "
                          f"({error})") from None
        if self.client_ca is not None:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=contents[2].decode("ascii"))
            except (ssl.SSLError, ValueError) as error:
                raise OSError(f"{self.client_ca} is not a PEM CA bundle ({error})") from None
        if self._stamps() != before:
            raise OSError("the certificate files changed while they were read")
        self._stamp = before
        return grpc.ssl_server_certificate_configuration(
            [(contents[1], contents[0])], root_certificates=contents[2] if self.client_ca is not None else None)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's certificate_configuration_fetcher: a new configuration when a file changed, else None."""
        with self._lock:
            stamp = self._stamps()
            if stamp == self._stamp or stamp == self._rejected:
                return None
            try:
                configuration = self.load()
            except Exception as error:  # never into gRPC core: keep serving the previous certificate
                self._rejected = stamp
                logger.warning("TLS files changed but cannot be used yet: %s; the previous certificate stays",
                               error)
                return None
            self.reloads += 1
            logger.info("TLS certificate reloaded from %s (reload %d)", self.cert, self.reloads)
            return configuration


def _no_password() -> bytes:
    raise ValueError("the key is encrypted; give an unencrypted key")


def server_credentials(settings: ServerSettings) -> tuple[grpc.ServerCredentials, CertificateFiles] | None:
    """TLS credentials that reload their files (None when tls_cert is unset). Raises OSError for bad files."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    files = CertificateFiles(settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    credentials = grpc.dynamic_ssl_server_credentials(
        files.load(), files.fetch, require_client_authentication=settings.tls_client_ca is not None)
    return credentials, files


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def describe(settings: ServerSettings) -> str:
    """One line for the startup log: transport and authorization."""
    transport = "plaintext" if settings.tls_cert is None else (
        "mutual TLS" if settings.tls_client_ca is not None else "TLS")
    if settings.auth_tokens or settings.auth_mtls_roles:
        return (f"{transport}, authorization on ({len(settings.auth_tokens)} tokens, "
                f"{len(settings.auth_mtls_roles)} certificate identities)")
    return f"{transport}, authorization off"


def warn_if_open(settings: ServerSettings) -> None:
    """Log a warning when a non-loopback address serves without authorization."""
    if settings.auth_tokens or settings.auth_mtls_roles or is_loopback(settings.host):
        return
    who = ("any client with a certificate from tls_client_ca" if settings.tls_client_ca is not None
           else "anyone who can reach the port")
    logger.warning("listening on %s without authorization: %s may upsert and delete items and end sessions "
                   "(set auth_tokens or auth_mtls_roles)", settings.host, who)


# --- python -m llmrec.server.security -------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """new-token [NAME [ROLES]]: a random token and its auth_tokens entry; hash-token: hash a token (stdin)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["new-token"]:
        name = args[1] if len(args) > 1 else "client"
        roles = parse_roles(args[2] if len(args) > 2 else "read", "new-token")
        token = secrets.token_urlsafe(32)
        print(f"token (give it to the client, e.g. LLMREC_TOKEN): {token}")
        print(f"auth_tokens entry (give it to the server):      {name}@{hash_token(token)}="
              f"{','.join(sorted_roles(roles))}")
        return 0
    if args[:1] == ["hash-token"]:
        token = sys.stdin.readline().strip()
        if not token:
            print("hash-token: give the token on stdin", file=sys.stderr)
            return 2
        print(hash_token(token))
        return 0
    print("usage: python -m llmrec.server.security new-token [NAME [ROLES]] | hash-token < token-file",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
