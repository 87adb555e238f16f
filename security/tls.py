"""gRPC adapters of the cluster identities: credentials, channels, the peer's identity, and the
interceptor that enforces `security.identity.METHOD_ROLES` on a server.

Servers require a client certificate from the cluster CA (`require_client_auth=True`): a peer
with no certificate or one from another CA fails the TLS handshake (the client sees
UNAVAILABLE) before any RPC exists. Which verified peer may call which method is then the
interceptor's decision, made once per call before the handler runs.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc

from security.certs import Credentials
from security.identity import (
    ANY_AGENT_DNS,
    LINK_SECRET_KEY,
    TRUST_DOMAIN,
    Refusal,
    check_call,
    dns_name,
)

log = logging.getLogger("lockstep.security")
_PEER_PREFIX = f"spiffe://{TRUST_DOMAIN}/".encode()


def server_credentials(creds: Credentials) -> grpc.ServerCredentials:
    """Serve with `creds`' certificate; clients must present one signed by the cluster CA."""
    return grpc.ssl_server_credentials(
        [(creds.key_pem, creds.cert_pem)], root_certificates=creds.ca_pem, require_client_auth=True
    )


def channel_credentials(creds: Credentials) -> grpc.ChannelCredentials:
    """Dial as `creds`' identity, trusting only the cluster CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=creds.ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_pem
    )


def target_options(peer: str | None) -> list[tuple[str, Any]]:
    """Check the server's certificate for `peer`'s DNS name (an identity), or for any agent of
    the cluster when `peer` is None: addresses are IPs and ports, identities are names."""
    return [("grpc.ssl_target_name_override", dns_name(peer) if peer else ANY_AGENT_DNS)]


def open_channel(
    address: str,
    creds: Credentials | None,
    *,
    peer: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A channel to `address`: mutual TLS as `creds` (expecting `peer`), plaintext when None."""
    if creds is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(
        address, channel_credentials(creds), options=[*options, *target_options(peer)]
    )


def peer_identity(context: grpc.ServicerContext) -> str | None:
    """The verified peer's Lockstep identity: the one `spiffe://lockstep/...` URI SAN of its
    certificate (checked against the CA by the handshake), or None (plaintext, no or several)."""
    try:
        uris: list[bytes] = context.auth_context().get("peer_uri", [])
    except (AttributeError, ValueError):
        return None
    return identity_of_uris(uris)


def identity_of_uris(uris: Iterable[bytes]) -> str | None:
    """The one `spiffe://lockstep/...` URI among a certificate's URI SANs, or None (no or
    several, or not ASCII): the rule both gRPC and the framed links (`ssl_peer_identity`) use."""
    ours = [u for u in uris if u.startswith(_PEER_PREFIX)]
    if len(ours) != 1:
        return None
    try:
        return ours[0].decode("ascii")
    except UnicodeDecodeError:
        return None


def ssl_peer_identity(sock: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """`peer_identity` for a Python `ssl` connection whose handshake verified the peer."""
    cert = sock.getpeercert()
    if not cert:
        return None
    sans: Any = cert.get("subjectAltName", ())
    return identity_of_uris(
        str(value).encode("utf-8", "replace") for kind, value in sans if kind == "URI"
    )


def ssl_context(creds: Credentials, *, server_side: bool) -> ssl.SSLContext:
    """A Python `ssl` context with the same trust as the gRPC credentials: this peer's
    certificate, only the cluster CA trusted, the peer's certificate required (mutual TLS),
    TLS 1.3 only. A client context checks the server's host name: set `server_hostname` to
    `security.identity.dns_name` of the identity it expects, as `target_options` does.

    The key is PEM bytes in memory; `load_cert_chain` reads files only, so it goes through a
    private temporary directory (0700, removed at once)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=creds.ca_pem.decode("ascii"))
    with tempfile.TemporaryDirectory(prefix="lockstep-tls-") as tmp:
        cert, key = os.path.join(tmp, "cert.pem"), os.path.join(tmp, "key.pem")
        with open(cert, "wb") as f:
            f.write(creds.cert_pem)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(creds.key_pem)
        ctx.load_cert_chain(cert, key)
    if server_side:
        ctx.num_tickets = 0  # links are long-lived: no session resumption to keep tickets for
    return ctx


def link_metadata(secret: bytes) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying a link secret (hex: the key is not a `-bin` key)."""
    return ((LINK_SECRET_KEY, secret.hex()),) if secret else ()


def link_secret(context: grpc.ServicerContext) -> bytes | None:
    """The link secret a Link stream presented, or None (absent or not hex)."""
    for key, value in context.invocation_metadata() or ():
        if key == LINK_SECRET_KEY:
            try:
                return bytes.fromhex(value if isinstance(value, str) else value.decode("ascii"))
            except (ValueError, UnicodeDecodeError):
                return None
    return None


def status_code(refusal: Refusal) -> grpc.StatusCode:
    code: grpc.StatusCode = getattr(grpc.StatusCode, refusal.code)
    return code


class AuthorizationInterceptor(grpc.ServerInterceptor):  # type: ignore[misc]
    """Refuses a call whose verified peer identity may not call the method (the table in
    `security.identity`): PERMISSION_DENIED (or UNAUTHENTICATED) naming identity and method,
    before the handler sees a request. `node` prefixes messages like the agent's own errors."""

    def __init__(self, node: str) -> None:
        self.node = node

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None:
            return None
        method: str = details.method
        for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
            behavior = getattr(handler, kind)
            if behavior is not None:
                return handler._replace(**{kind: self._guard(method, behavior)})
        return handler

    def _guard(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(request: Any, context: grpc.ServicerContext) -> Any:
            identity = peer_identity(context)
            refusal = check_call(method, identity)
            if refusal is not None:
                log.warning("refused %s: %s", method[:120], refusal.message)
                context.abort(status_code(refusal), f"node {self.node}: {refusal.message}")
            return behavior(request, context)

        return guarded
