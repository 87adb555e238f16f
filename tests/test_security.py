"""Identities, the authorization tables and the certificate directory, without processes."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography import x509

from agents.errors import PermissionDenied, Unauthenticated
from agents.link_auth import link_authorizer
from agents.main import is_loopback_listen
from orchestrator.cli import main as lpuctl
from orchestrator.serving import configure_requests
from protos import agent_pb2, interconnect_pb2
from security import certs
from security.identity import (
    CONTROL_PLANE,
    LINK_SECRET_KEY,
    METHOD_ROLES,
    Role,
    agent_identity,
    check_call,
    check_link,
    dns_name,
    role_of,
)
from security.tls import link_metadata

N0, N1 = agent_identity("n0"), agent_identity("n1")
SECRET = bytes(range(32))


def _methods(descriptor: Any, service: str) -> list[str]:
    svc = descriptor.services_by_name[service]
    return [f"/{svc.full_name}/{m.name}" for m in svc.methods]


AGENT_METHODS = _methods(agent_pb2.DESCRIPTOR, "Agent")
LINK_METHODS = _methods(interconnect_pb2.DESCRIPTOR, "Link")


def test_every_rpc_is_in_the_table_and_only_status_is_open_to_agents() -> None:
    assert set(METHOD_ROLES) == set(AGENT_METHODS) | set(LINK_METHODS)
    for method in AGENT_METHODS:
        assert check_call(method, CONTROL_PLANE) is None, method
        refusal = check_call(method, N0)
        if method.endswith("/Status"):
            assert refusal is None
        else:
            assert refusal is not None and refusal.code == "PERMISSION_DENIED", method
            assert N0 in refusal.message and method in refusal.message
    (exchange,) = LINK_METHODS
    assert check_call(exchange, N0) is None
    refused = check_call(exchange, CONTROL_PLANE)
    assert refused is not None and refused.code == "PERMISSION_DENIED"


def test_unknown_methods_and_identities_are_refused_open_services_are_not() -> None:
    unknown = check_call("/lockstep.agent.v1.Agent/Backdoor", CONTROL_PLANE)
    assert unknown is not None and "not in the authorization table" in unknown.message
    status = "/lockstep.agent.v1.Agent/Status"
    missing = check_call(status, None)
    assert missing is not None and missing.code == "UNAUTHENTICATED"
    for stranger in ("spiffe://other/control-plane", "spiffe://lockstep/agent/../x", ""):
        refusal = check_call(status, stranger)
        assert refusal is not None and refusal.code == "PERMISSION_DENIED", stranger
    assert check_call("/grpc.health.v1.Health/Check", None) is None
    assert check_call("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", N0) is None


def test_identities_roles_and_names() -> None:
    assert role_of(CONTROL_PLANE) is Role.CONTROL_PLANE
    assert role_of(N0) is Role.AGENT
    assert role_of(None) is None and role_of("spiffe://lockstep/agent/") is None
    assert dns_name(N0) == "n0.agent.lockstep"
    assert dns_name(CONTROL_PLANE) == "control-plane.lockstep"
    assert dns_name(agent_identity("rack-0/node-3")) == "rack-0.node-3.agent.lockstep"
    for bad in ("", "../etc", "a//b", "/a", "a/", "-x", "x" * 64, "n 0", "a.b", "a/b/c/d/e"):
        with pytest.raises(ValueError, match="node name"):
            agent_identity(bad)


@pytest.mark.parametrize(
    ("identity", "secret", "code", "words"),
    [
        (N0, SECRET, None, ""),
        (None, SECRET, "UNAUTHENTICATED", "client certificate"),
        (N1, SECRET, "PERMISSION_DENIED", "not the configured upstream"),
        (CONTROL_PLANE, SECRET, "PERMISSION_DENIED", "not the configured upstream"),
        (N0, None, "UNAUTHENTICATED", "link secret"),
        (N0, b"", "UNAUTHENTICATED", "link secret"),
        (N0, SECRET[:-1] + b"\x00", "PERMISSION_DENIED", "wrong link secret"),
    ],
)
def test_check_link(
    identity: str | None, secret: bytes | None, code: str | None, words: str
) -> None:
    refusal = check_link(identity, secret, N0, SECRET, "d/replica-0/stage-1")
    if code is None:
        assert refusal is None
    else:
        assert refusal is not None and refusal.code == code and words in refusal.message
        assert "stage-1" in refusal.message


def test_a_stage_with_a_local_upstream_accepts_no_link() -> None:
    refusal = check_link(N0, SECRET, "", SECRET, "s")
    assert refusal is not None and "no remote upstream" in refusal.message


class FakeContext:
    def __init__(self, identity: str | None, metadata: tuple[tuple[str, str], ...]) -> None:
        self._auth = {} if identity is None else {"peer_uri": [identity.encode()]}
        self._metadata = metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._auth

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata


class FakeRunner:
    label = "d/replica-0/stage-1 (chip c1)"
    stage = 1


def test_link_authorizer_reads_peer_and_secret_from_the_call() -> None:
    runner = FakeRunner()
    authorize = link_authorizer(lambda r: (N0, SECRET) if r is runner else None)
    authorize(FakeContext(N0, link_metadata(SECRET)), runner)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="n1"):
        authorize(FakeContext(N1, link_metadata(SECRET)), runner)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="wrong link secret"):
        authorize(FakeContext(N0, link_metadata(b"x" * 32)), runner)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        authorize(FakeContext(N0, ((LINK_SECRET_KEY, "not hex"),)), runner)  # type: ignore[arg-type]
    with pytest.raises(Unauthenticated):
        authorize(FakeContext(None, link_metadata(SECRET)), runner)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="no longer configured"):
        link_authorizer(lambda r: None)(FakeContext(N0, ()), runner)  # type: ignore[arg-type]


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_certificate_directory_layout_modes_and_names(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert certs.init_cluster(directory) == (True, True)
    creds = certs.ensure_agent(directory, "n0")
    assert creds.identity == N0
    for name in ("ca.key", "control-plane.key", "agents/n0.key"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    ca = _cert(directory / "ca.crt")
    for name, identity, dns in [
        ("control-plane.crt", CONTROL_PLANE, "control-plane.lockstep"),
        ("agents/n0.crt", N0, "n0.agent.lockstep"),
    ]:
        cert = _cert(directory / name)
        cert.verify_directly_issued_by(ca)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [identity]
        assert dns in san.get_values_for_type(x509.DNSName)
        assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=300)


def test_topology_node_ids_get_nested_files(tmp_path: Path) -> None:
    creds = certs.ensure_agent(tmp_path, "rack-0/node-3")
    assert creds.identity == "spiffe://lockstep/agent/rack-0/node-3"
    assert (tmp_path / "agents" / "rack-0" / "node-3.crt").read_bytes() == creds.cert_pem
    san = _cert(tmp_path / "agents/rack-0/node-3.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "rack-0.node-3.agent.lockstep" in san.value.get_values_for_type(x509.DNSName)


def test_creation_is_idempotent_and_rotation_issues_anew(tmp_path: Path) -> None:
    certs.init_cluster(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.glob("*.crt")}
    assert certs.init_cluster(tmp_path) == (False, False)
    assert {p: p.read_bytes() for p in tmp_path.glob("*.crt")} == before
    assert certs.issue(tmp_path, N0) and not certs.issue(tmp_path, N0)
    serial = _cert(tmp_path / "agents/n0.crt").serial_number
    assert certs.issue(tmp_path, N0, rotate=True)
    assert _cert(tmp_path / "agents/n0.crt").serial_number != serial
    # Due for renewal (inside renew_before_days of expiry): issued anew without --rotate.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=350)
    assert certs.issue(tmp_path, N0, now=later)


def test_a_certificate_from_another_ca_is_replaced(tmp_path: Path) -> None:
    certs.init_cluster(tmp_path / "a")
    certs.issue(tmp_path / "a", N0)
    (tmp_path / "b").mkdir()
    certs.init_ca(tmp_path / "b")
    (tmp_path / "b" / "agents").mkdir()
    for suffix in (".crt", ".key"):
        (tmp_path / "b" / "agents" / f"n0{suffix}").write_bytes(
            (tmp_path / "a" / "agents" / f"n0{suffix}").read_bytes()
        )
    assert certs.issue(tmp_path / "b", N0)
    _cert(tmp_path / "b/agents/n0.crt").verify_directly_issued_by(_cert(tmp_path / "b/ca.crt"))


def test_issue_needs_a_ca_and_a_lone_ca_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(certs.CertError, match="no cluster CA"):
        certs.issue(tmp_path, N0)
    certs.init_ca(tmp_path)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(certs.CertError, match=r"only one of ca\.crt and ca\.key"):
        certs.init_ca(tmp_path)


def test_lpuctl_certs_init_twice_is_idempotent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    directory = tmp_path / "cluster"
    assert lpuctl(["certs", "init", str(directory)]) == 0
    first = capsys.readouterr().out
    assert "created cluster CA" in first and "created control-plane certificate" in first
    files = {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    assert lpuctl(["certs", "init", str(directory)]) == 0
    second = capsys.readouterr().out
    assert second.count("kept existing") == 2 and "created" not in second
    assert {p: p.read_bytes() for p in directory.rglob("*") if p.is_file()} == files
    assert lpuctl(["certs", "issue", str(directory), "--node", "n3"]) == 0
    assert (directory / "agents" / "n3.crt").exists()
    assert "created certificate for spiffe://lockstep/agent/n3" in capsys.readouterr().out
    assert lpuctl(["certs", "issue", str(directory), "--node", "../n3"]) == 2
    assert "node name" in capsys.readouterr().err
    assert lpuctl(["certs", "issue", str(tmp_path / "empty"), "--node", "n3"]) == 2
    assert "lpuctl certs init" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:0", True),
        ("127.3.2.1:50051", True),
        ("localhost:1", True),
        ("[::1]:0", True),
        ("0.0.0.0:0", False),
        ("[::]:0", False),
        ("10.0.0.5:50051", False),
        ("example.org:1", False),
    ],
)
def test_loopback_listen_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback_listen(listen) is loopback


def _ref(stage: int, chip: str) -> Any:
    binding = SimpleNamespace(replica=0, stage=stage, stages=3, tp_rank=0)
    return SimpleNamespace(binding=binding, chip=chip, shard_id=f"{stage:064x}")


def test_configure_requests_name_the_neighbours_and_a_fresh_secret_per_replica() -> None:
    """Stages 0-1 on agent A (n0), stage 2 on agent B (n1): 0 is fed by n1 over the network,
    1 by stage 0 in process (no identity), 2 by n0."""
    plan = SimpleNamespace(deployment="d", max_batch=4, max_context=64)
    refs = [_ref(0, "c0"), _ref(1, "c1"), _ref(2, "c2")]
    where = {"c0": ("A", 0), "c1": ("A", 1), "c2": ("B", 0)}
    nodes = {"A": "n0", "B": "n1"}
    first = configure_requests(plan, refs, where, nodes=nodes)  # type: ignore[arg-type]
    stages = {a.stage: a for r in first.values() for a in r.assignments}
    assert [stages[s].upstream_identity for s in range(3)] == [N1, "", N0]
    assert [stages[s].downstream_identity for s in range(3)] == ["", N1, N0]
    secrets = {r.link_secret for r in first.values()}
    assert len(secrets) == 1 and len(secrets.pop()) == 32
    again = configure_requests(plan, refs, where, nodes=nodes)  # type: ignore[arg-type]
    assert again["A"].link_secret != first["A"].link_secret
    plain = configure_requests(plan, refs, where)  # type: ignore[arg-type]
    assert all(not a.upstream_identity for r in plain.values() for a in r.assignments)


def test_an_agent_renews_a_due_certificate_and_refuses_an_unusable_one(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    certs.issue(tmp_path, N0, days=-1)  # expired yesterday
    renewed = certs.ensure_agent(tmp_path, "n0")  # the CA key is here: renewed on start
    assert _cert(tmp_path / "agents/n0.crt").not_valid_after_utc > dt.datetime.now(dt.UTC)
    assert renewed.cert_pem == (tmp_path / "agents/n0.crt").read_bytes()
    # Production layout: no CA key beside the agent's files, so nothing can renew it.
    certs.issue(tmp_path, N0, days=-1)
    (tmp_path / "ca.key").unlink()
    with pytest.raises(certs.CertError, match="not now: issue a new one"):
        certs.ensure_agent(tmp_path, "n0")
    other = tmp_path / "other"
    certs.init_ca(other)
    (tmp_path / "ca.crt").write_bytes((other / "ca.crt").read_bytes())
    with pytest.raises(certs.CertError, match="not issued by the CA"):
        certs.ensure_agent(tmp_path, "n0")
