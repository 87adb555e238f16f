"""`lpuctl up --listen HOST`: the control plane serves on that address, not on 127.0.0.1.

On loopback with an explicit address other than 127.0.0.1 (127.0.0.2, which Linux routes to
the loopback interface): the admin, registry and metrics ports listen there only; the agents
register at the registry address the runtime is given (so `up` finishes only if that address
is the routable one); the control plane's certificate names the address, so a client can
verify it by IP; `lpuctl` finds it through endpoint.json.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from test_control_plane import _left, _processes_of

from orchestrator.control_plane import (
    StatePaths,
    certificate_hosts,
    host_port,
    routable_host,
    token_for,
)
from protos import admin_pb2, admin_pb2_grpc
from security import certs as certs_mod
from security.certs import cert_hosts, paths_for
from security.identity import CONTROL_PLANE

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.2"


def _loopback_alias_works() -> bool:
    try:
        with socket.socket() as s:
            s.bind((HOST, 0))
        return True
    except OSError:
        return False


def lpuctl(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )


def listening_hosts(pid: int, port: int) -> set[str]:
    """The local addresses `pid` listens on at `port`, read from /proc: whether another
    process on this machine happens to listen on 127.0.0.1 at the same port number says
    nothing about the control plane, so a connect() test would be flaky."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    hosts = set()
    for table, width in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            address, port_hex = local.split(":")
            if state != "0A" or int(port_hex, 16) != port or inode not in inodes:
                continue  # 0A: LISTEN
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(words if width == 16 else words[:4])
            mapped = getattr(ip, "ipv4_mapped", None)  # gRPC listens on ::ffff:a.b.c.d
            hosts.add(str(mapped or ip))
    return hosts


@pytest.mark.skipif(not _loopback_alias_works(), reason=f"{HOST} is not a loopback address here")
def test_up_listens_on_the_given_host_only(tmp_path: Path) -> None:
    env = {**os.environ, "LOCKSTEP_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    for key in ("LOCKSTEP_SERVER", "LOCKSTEP_TOKEN", "LOCKSTEP_CA"):
        env.pop(key, None)
    env["LOCKSTEP_CONFIG"] = str(tmp_path / "no-config.yaml")
    paths = StatePaths(tmp_path)
    endpoint: dict[str, object] = {}
    try:
        up = lpuctl(
            env, "up", "--listen", HOST, "--racks", "1", "--nodes-per-rack", "2", "--timeout", "90"
        )
        assert up.returncode == 0, up.stdout + up.stderr  # both agents registered at HOST
        endpoint = json.loads(paths.endpoint.read_text())
        admin, registry = str(endpoint["admin"]), str(endpoint["registry"])
        assert admin.startswith(f"{HOST}:") and registry.startswith(f"{HOST}:")
        assert str(endpoint["metrics"]).startswith(f"https://{HOST}:")
        metrics_port = int(str(endpoint["metrics"]).rsplit(":", 1)[1].split("/")[0])
        pid = int(str(endpoint["pid"]))
        for port in (int(admin.rsplit(":", 1)[1]), int(registry.rsplit(":", 1)[1]), metrics_port):
            assert listening_hosts(pid, port) == {HOST}, f"port {port} listens beyond {HOST}"

        cert_path, _ = paths_for(paths.certs, CONTROL_PLANE)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        assert x509.IPAddress(ipaddress.ip_address(HOST)) in cert_hosts(cert)

        # Verified by its address alone (no target-name override): the SAN names HOST.
        ca = (paths.certs / "ca.crt").read_bytes()
        with grpc.secure_channel(admin, grpc.ssl_channel_credentials(ca)) as channel:
            nodes = (
                admin_pb2_grpc.AdminStub(channel)
                .ListNodes(
                    admin_pb2.ListNodesRequest(),
                    metadata=(("authorization", f"Bearer {token_for(paths, 'viewer')}"),),
                    timeout=10,
                )
                .nodes
            )
        assert sorted(n.name for n in nodes) == ["rack-0/node-0", "rack-0/node-1"]
        assert all(n.state == "Ready" for n in nodes)
        run = lpuctl(env, "get", "nodes")
        assert run.returncode == 0 and "rack-0/node-1" in run.stdout, run.stderr
    finally:
        down = lpuctl(env, "down")
        assert down.returncode == 0, down.stderr
        assert not _left(endpoint), f"processes left after lpuctl down: {_left(endpoint)}"
        assert not _processes_of(tmp_path), f"processes left: {_processes_of(tmp_path)}"


def test_addresses_and_certificate_hosts() -> None:
    assert routable_host("127.0.0.2") == "127.0.0.2"
    wild = routable_host("0.0.0.0")
    assert wild not in ("0.0.0.0", "") and socket.inet_aton(wild)
    assert certificate_hosts("0.0.0.0", "10.1.2.3") == ("10.1.2.3",)
    assert certificate_hosts("10.1.2.3", "10.1.2.3") == ("10.1.2.3",)
    assert certificate_hosts("0.0.0.0", "cp.example") == ("cp.example",)
    assert host_port("::1", 5) == "[::1]:5" and host_port("10.0.0.1", 5) == "10.0.0.1:5"


def test_the_certificate_is_reissued_when_the_listen_host_changes(tmp_path: Path) -> None:
    certs_mod.init_cluster(tmp_path)
    cert_path, _ = paths_for(tmp_path, CONTROL_PLANE)
    first = cert_path.read_bytes()
    # Same hosts (none asked): kept.
    assert certs_mod.init_cluster(tmp_path) == (False, False)
    made = certs_mod.init_cluster(tmp_path, hosts=("10.1.2.3", "cp.example"))
    assert made == (False, True) and cert_path.read_bytes() != first
    names = cert_hosts(x509.load_pem_x509_certificate(cert_path.read_bytes()))
    assert x509.DNSName("cp.example") in names
    # Asked again for hosts it names: kept.
    assert certs_mod.init_cluster(tmp_path, hosts=("10.1.2.3",)) == (False, False)
