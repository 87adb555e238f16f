"""Who may feed a stage over a Link: the replica's configured upstream agent, with its secret.

`ConfigureReplica` names, per stage, the identity of the agent hosting the upstream stage and
gives the replica a random link secret. A Link stream into a stage is accepted only when the
peer certificate's identity is that upstream (another node's valid certificate is refused) and
the stream presents the secret in its metadata (`x-lockstep-link-secret`), so a certificate
alone — say of an agent that hosted the stage in an earlier epoch — is not enough, and the
secret alone is useless without the upstream's key. The decision itself is
`security.identity.check_link` (pure); this module only fetches its inputs.
"""

from __future__ import annotations

from collections.abc import Callable

import grpc

from agents.errors import PermissionDenied, Unauthenticated
from agents.pipeline import StageRunner
from security.identity import check_link
from security.tls import link_secret, peer_identity

LinkPolicyOf = Callable[[StageRunner], "tuple[str, bytes] | None"]


def authorize_link(
    policy_of: LinkPolicyOf, runner: StageRunner, identity: str | None, secret: bytes | None
) -> None:
    """Return when the peer `identity` presenting `secret` may feed `runner`; raise
    `PermissionDenied` or `Unauthenticated` (naming peer and stage) if not. Transport-neutral:
    the gRPC Link reads identity and secret from the call, the framed link (`agents.wire`)
    from its TLS session and hello frame."""
    policy = policy_of(runner)
    if policy is None:
        raise PermissionDenied(f"{runner.label} is no longer configured")
    expected_identity, expected_secret = policy
    refusal = check_link(identity, secret, expected_identity, expected_secret, runner.label)
    if refusal is None:
        return
    if refusal.code == "UNAUTHENTICATED":
        raise Unauthenticated(refusal.message)
    raise PermissionDenied(refusal.message)


def link_authorizer(
    policy_of: LinkPolicyOf,
) -> Callable[[grpc.ServicerContext, StageRunner], None]:
    """`authorize(context, runner)` for `LinkService`: returns when the stream's peer may feed
    `runner`, raises `PermissionDenied` or `Unauthenticated` (naming peer and stage) if not.
    `policy_of(runner)` gives (upstream identity, link secret), None when not configured."""

    def authorize(context: grpc.ServicerContext, runner: StageRunner) -> None:
        authorize_link(policy_of, runner, peer_identity(context), link_secret(context))

    return authorize
