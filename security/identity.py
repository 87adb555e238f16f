"""Who is who in a Lockstep cluster, and who may call what: pure data and pure checks.

An identity is a SPIFFE-style URI carried as the URI subject-alternative name of a certificate
issued by the cluster CA:

- `spiffe://lockstep/control-plane` — the control plane (lpuctl, the operator, the gateway);
- `spiffe://lockstep/agent/<node>` — the node agent of `<node>` (e.g. `rack-0/node-3`).

Every certificate also carries a DNS name derived from its identity (`control-plane.lockstep`,
`<node>.agent.lockstep` with `/` as `.`) and agents the shared `agent.lockstep`: gRPC clients
verify a server's certificate by host name, so a client that knows which agent it dials sets
`grpc.ssl_target_name_override` to that agent's DNS name (and gets exactly that agent), one
that only knows "an agent of this cluster" (a LinkPing probe) uses the shared one.

`METHOD_ROLES` is the authorization table, one row per gRPC method; a method missing from it
is refused (fail closed), so a new RPC cannot be reachable by everyone by accident. The
checks here take the peer identity as a string and return a `Refusal` (or None), so they are
tested without sockets; `security.tls` reads the identity from the TLS handshake.
"""

from __future__ import annotations

import hmac
import re
from dataclasses import dataclass
from enum import Enum

TRUST_DOMAIN = "lockstep"
_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
CONTROL_PLANE = f"{_PREFIX}control-plane"
AGENT_PREFIX = f"{_PREFIX}agent/"
AGENT_DNS_SUFFIX = f".agent.{TRUST_DOMAIN}"
ANY_AGENT_DNS = f"agent.{TRUST_DOMAIN}"
CONTROL_PLANE_DNS = f"control-plane.{TRUST_DOMAIN}"

# Node names become file paths (agents/<node>.crt), URI paths and DNS labels: plain segments,
# `/`-separated like the topology's node ids (`rack-0/node-3`, up to 4 segments).
_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}"
_NODE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT}){{0,3}}")

# gRPC metadata key of the per-replica link secret (lower case, as gRPC requires).
LINK_SECRET_KEY = "x-lockstep-link-secret"
LINK_SECRET_BYTES = 32


class Role(Enum):
    CONTROL_PLANE = "control-plane"
    AGENT = "agent"


def check_node_name(node: str) -> str:
    """`node` if it is usable in a file name, a URI and a DNS label; ValueError otherwise."""
    if not _NODE.fullmatch(node):
        raise ValueError(
            f"node name {node[:80]!r} must be 1-4 '/'-separated parts of 1-63 letters, "
            "digits, '-' or '_', each starting with a letter or digit (e.g. rack-0/node-3)"
        )
    return node


def agent_identity(node: str) -> str:
    return AGENT_PREFIX + check_node_name(node)


def dns_name(identity: str) -> str:
    """The DNS name a certificate for `identity` carries (the TLS host-name check uses it)."""
    if identity == CONTROL_PLANE:
        return CONTROL_PLANE_DNS
    if identity.startswith(AGENT_PREFIX):
        node = check_node_name(identity.removeprefix(AGENT_PREFIX))
        return node.replace("/", ".") + AGENT_DNS_SUFFIX  # segments have no dots: one-to-one
    raise ValueError(f"not a Lockstep identity: {identity[:120]!r}")


def role_of(identity: str | None) -> Role | None:
    if identity == CONTROL_PLANE:
        return Role.CONTROL_PLANE
    if identity is not None and identity.startswith(AGENT_PREFIX):
        node = identity.removeprefix(AGENT_PREFIX)
        if _NODE.fullmatch(node):
            return Role.AGENT
    return None


AGENT_SERVICE = "lockstep.agent.v1.Agent"
LINK_SERVICE = "lockstep.interconnect.v1.Link"

# Services every verified peer of the cluster may call (nothing in them changes state).
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

_CP = frozenset({Role.CONTROL_PLANE})
METHOD_ROLES: dict[str, frozenset[Role]] = {
    f"/{AGENT_SERVICE}/Status": frozenset({Role.CONTROL_PLANE, Role.AGENT}),
    f"/{AGENT_SERVICE}/LoadShard": _CP,
    f"/{AGENT_SERVICE}/UnloadShard": _CP,
    f"/{AGENT_SERVICE}/Execute": _CP,
    f"/{AGENT_SERVICE}/MarkChipFailed": _CP,
    f"/{AGENT_SERVICE}/StageDigests": _CP,
    f"/{AGENT_SERVICE}/InjectFault": _CP,
    f"/{AGENT_SERVICE}/ConfigureReplica": _CP,
    f"/{AGENT_SERVICE}/StartEpoch": _CP,
    f"/{AGENT_SERVICE}/Halt": _CP,
    f"/{AGENT_SERVICE}/RemoveReplica": _CP,
    # Until the control plane's gateway exists, clients reach Generate through it only.
    f"/{AGENT_SERVICE}/Generate": _CP,
    # LinkPing makes the agent open a stream to a peer: an admin action.
    f"/{AGENT_SERVICE}/LinkPing": _CP,
    # Only agents send frames; which agent may feed which stage is `check_link`'s job.
    f"/{LINK_SERVICE}/Exchange": frozenset({Role.AGENT}),
}


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused; `code` is a gRPC status code name."""

    code: str  # "PERMISSION_DENIED" or "UNAUTHENTICATED"
    message: str


def _short(identity: str | None) -> str:
    return "no identity" if identity is None else repr(identity[:120])


def check_call(method: str, identity: str | None) -> Refusal | None:
    """None when the peer `identity` may call `method` (a full name, `/package.Service/M`)."""
    service = method.lstrip("/").split("/", 1)[0]
    if service in OPEN_SERVICES:
        return None
    allowed = METHOD_ROLES.get(method)
    if allowed is None:
        return Refusal("PERMISSION_DENIED", f"{method[:120]} is not in the authorization table")
    if identity is None:
        return Refusal(
            "UNAUTHENTICATED",
            f"{method} needs a client certificate with a Lockstep identity (URI SAN)",
        )
    if role_of(identity) not in allowed:
        roles = " or ".join(sorted(r.value for r in allowed))
        return Refusal(
            "PERMISSION_DENIED", f"{_short(identity)} may not call {method} (only {roles})"
        )
    return None


def check_link(
    identity: str | None,
    secret: bytes | None,
    expected_identity: str,
    expected_secret: bytes,
    what: str,
) -> Refusal | None:
    """None when a Link stream into `what` (a stage's label) comes from the configured upstream
    agent and presents the replica's link secret (compared in constant time)."""
    if identity is None:
        return Refusal("UNAUTHENTICATED", f"a link into {what} needs a client certificate")
    if not expected_identity:
        return Refusal(
            "PERMISSION_DENIED",
            f"{what} has no remote upstream configured: refusing a link from {_short(identity)}",
        )
    if not hmac.compare_digest(identity.encode(), expected_identity.encode()):
        return Refusal(
            "PERMISSION_DENIED",
            f"{_short(identity)} is not the configured upstream of {what} "
            f"({_short(expected_identity)})",
        )
    if not secret:
        return Refusal("UNAUTHENTICATED", f"a link into {what} must present the link secret")
    if not expected_secret or not hmac.compare_digest(secret, expected_secret):
        return Refusal("PERMISSION_DENIED", f"wrong link secret for {what}")
    return None
