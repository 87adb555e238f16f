"""The real kubectl against the stand-in API server, with the operator running a real embedded
cluster (process runtime, six real agents): apply, get with printer columns, scale, describe,
delete through the finalizer; bad deployment files through `kubectl apply`; leader election
with two operator processes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from agent_helpers import wait_for
from kube_standin import StandIn

from orchestrator import crd as crd_module
from orchestrator.store import Store

REPO = Path(__file__).resolve().parent.parent
KUBECTL = "/usr/bin/kubectl"
EXAMPLE = REPO / "manifests" / "examples" / "tiny-llama.yaml"
BAD = REPO / "tests" / "data" / "specs" / "bad"


class Kubectl:
    def __init__(self, server: StandIn, home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        self.config = home / "kubeconfig"
        self.config.write_text(yaml.safe_dump(server.kubeconfig()))
        self.env = {**os.environ, "HOME": str(home), "KUBECONFIG": str(self.config)}

    def __call__(self, *args: str, stdin: str | None = None) -> str:
        out = self.run(*args, stdin=stdin)
        assert out.returncode == 0, f"kubectl {' '.join(args)}: {out.stderr}"
        return out.stdout

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [KUBECTL, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=180,
            env=self.env,
        )


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[StandIn, Kubectl]]:
    server = StandIn().start()
    kubectl = Kubectl(server, tmp_path / "home")
    kubectl("apply", "-f", str(crd_module.CRD_PATH))
    yield server, kubectl
    server.stop()


class OperatorProcess:
    """`python -m orchestrator.operator` as a process; its stdout lines are collected."""

    def __init__(self, config: Path, state: Path, identity: str, *extra: str) -> None:
        self.lines: list[str] = []
        self.log = (state.parent / f"{identity}.log").open("w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "orchestrator.operator",
                f"--kubeconfig={config}",
                f"--identity={identity}",
                "--lease-namespace=default",
                f"--state={state}",
                "--sync-interval=0.2",
                *extra,
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            start_new_session=True,
        )
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.strip())

    @property
    def leading(self) -> bool:
        return any(line.startswith("leading as") for line in self.lines)

    def wait_leading(self, timeout: float = 120.0) -> None:
        """Until it leads (its control plane started); fail if it exits first."""
        wait_for(
            lambda: self.leading or self.proc.poll() is not None,
            timeout=timeout,
            interval=0.2,
            what="the operator leading",
        )
        assert self.leading, self.lines

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)
        self.reader.join(10)
        self.log.close()


def table(kubectl: Kubectl, *args: str) -> list[dict[str, str]]:
    lines = [line for line in kubectl("get", "lpud", *args).splitlines() if line.strip()]
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=False)) for line in lines[1:]]


def plan_of(path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "plan", "-f", str(path), "-o", "json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_kubectl_apply_get_scale_describe_delete(cluster: Any, tmp_path: Path) -> None:
    server, kubectl = cluster
    state = tmp_path / "state"
    operator = OperatorProcess(kubectl.config, state, "op-a", "--racks=2", "--nodes-per-rack=3")
    try:
        operator.wait_leading()
        assert "created" in kubectl("apply", "-f", str(EXAMPLE))
        wait_for(
            lambda: (
                kubectl("get", "lpud", "tiny-llama", "-o", "jsonpath={.status.phase}") == "Ready"
            ),
            timeout=180,
            interval=0.2,
            what="tiny-llama Ready",
        )
        plan = plan_of(EXAMPLE)  # the planner lpuctl uses, on the same 2 x 3 dev topology
        [row] = table(kubectl)
        assert row["NAME"] == "tiny-llama" and row["READY"] == "2/2" and row["PHASE"] == "Ready"
        assert int(row["CHIPS"]) == plan["chipsUsed"]
        assert int(row["RACKS"]) == 2
        assert float(row["TOKENS/S"]) == pytest.approx(plan["predicted"]["tokensPerSecond"], 1e-3)
        assert row["AGE"].endswith(("s", "m"))

        assert "scaled" in kubectl("scale", "lpud/tiny-llama", "--replicas", "1")
        wait_for(
            lambda: table(kubectl)[0]["READY"] == "1/1",
            timeout=120,
            interval=0.2,
            what="scaled to 1/1",
        )
        obj = json.loads(kubectl("get", "lpud", "tiny-llama", "-o", "json"))
        assert obj["metadata"]["generation"] == 2
        wait_for(
            lambda: (
                json.loads(kubectl("get", "lpud", "tiny-llama", "-o", "json"))["status"].get(
                    "observedGeneration"
                )
                == 2
            ),
            timeout=60,
            interval=0.2,
            what="observedGeneration 2",
        )
        [row] = table(kubectl)
        assert int(row["CHIPS"]) == plan["chipsUsed"] // 2 and int(row["RACKS"]) == 1

        described = kubectl("describe", "lpud", "tiny-llama")
        for fragment in (
            "Conditions:",
            "Type:                          Ready",
            "Events:",
            "Applied",
            "Placed",
            "ReadyTrue",
            "lockstep-operator",
        ):
            assert fragment in described, fragment

        uid = obj["metadata"]["uid"]
        assert "deleted" in kubectl("delete", "lpud", "tiny-llama", "--timeout=180s")
        assert "No resources found" in kubectl.run("get", "lpud").stderr
        events = server.list(server.resource("", "v1", "events"), "default")[0]
        reasons = [e["reason"] for e in events if e["involvedObject"]["uid"] == uid]
        assert "Deleted" in reasons or "DeleteRequested" in reasons, reasons
        with Store(state / "store.db", readonly=True) as store:
            assert store.deployments() == []
            assert store.held() == []  # every chip's SRAM was freed before the object went
    finally:
        operator.stop()
    assert operator.proc.returncode == 0


# Bad deployment files (tests/test_spec.py BAD_FILES) through kubectl apply. kubectl parses
# YAML itself: the hostile ones never leave it. What reaches the server is JSON, so three
# files cannot be told apart from good ones by any API server: duplicate keys (kubectl keeps
# the last), a second document (kubectl applies each) and a copied `status` (the status
# subresource drops it, and the operator overwrites it).
KUBECTL_REFUSES = {
    "billion-laughs.yaml": "excessive aliasing",
    "binary-tag.yaml": "!!binary",
    "png-garbage.yaml": "control characters are not allowed",
    "tabs.yaml": "found character that cannot start any token",
    "latin1.yaml": "metadata.name",  # bytes replaced by U+FFFD: not a DNS name (422)
    "python-object.yaml": "spec.model.preset",  # the tag is dropped: a list, not a string (422)
}
ACCEPTED_BY_ANY_API_SERVER = {"duplicate-keys.yaml", "multi-doc.yaml", "status.yaml"}


def test_bad_files_through_kubectl(cluster: Any) -> None:
    server, kubectl = cluster
    assert set(KUBECTL_REFUSES) | ACCEPTED_BY_ANY_API_SERVER == {p.name for p in BAD.iterdir()}
    for name, fragment in sorted(KUBECTL_REFUSES.items()):
        out = kubectl.run("apply", "-f", str(BAD / name))
        assert out.returncode != 0 and fragment in out.stderr, (name, out.stderr)
        assert "Traceback" not in out.stderr
    assert (
        server.list(server.resource("lpu.lockstep.dev", "v1alpha1", "lpudeployments"), "")[0] == []
    )
    kubectl("apply", "-f", str(BAD / "duplicate-keys.yaml"))
    dup = json.loads(kubectl("get", "lpud", "dup", "-o", "json"))
    assert dup["spec"]["replicas"] == 20  # kubectl kept the last key; lpuctl refuses the file
    kubectl("apply", "-f", str(BAD / "status.yaml"))
    assert "status" not in json.loads(kubectl("get", "lpud", "copied-from-kubectl", "-o", "json"))


LEASE_SECONDS = 4.0
RETRY_SECONDS = 0.5


def parse_time(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC).timestamp()


def lease_spec(server: StandIn) -> dict[str, Any]:
    leases = server.resource("coordination.k8s.io", "v1", "leases")
    return dict(server.get(leases, "default", "lockstep-operator")["spec"])


def finalized(kubectl: Kubectl, name: str) -> bool:
    out = kubectl("get", "lpud", name, "-o", "jsonpath={.metadata.finalizers}")
    return "lpu.lockstep.dev/release" in out


def test_two_operators_only_the_lease_holder_acts_and_the_other_takes_over(
    cluster: Any, tmp_path: Path
) -> None:
    """Two replicas without agents of their own (as in the Deployment): only the holder starts
    its control plane and touches LPUDeployments; SIGKILL it and the other takes over within
    the lease duration, measured on the Lease from the dead holder's last renewal to the new
    holder's acquisition."""
    server, kubectl = cluster
    timing = [
        f"--lease-duration={LEASE_SECONDS}",
        "--renew-deadline=3",
        f"--retry-period={RETRY_SECONDS}",
    ]
    a = OperatorProcess(kubectl.config, tmp_path / "a", "op-a", *timing)
    b: OperatorProcess | None = None
    try:
        a.wait_leading()
        b = OperatorProcess(kubectl.config, tmp_path / "b", "op-b", *timing)
        wait_for(
            lambda: any("op-b: waiting" in line for line in b_log(tmp_path)),
            timeout=60,
            interval=0.2,
            what="b waits",
        )
        kubectl("apply", "-f", str(EXAMPLE))
        wait_for(
            lambda: finalized(kubectl, "tiny-llama"),
            timeout=60,
            interval=0.2,
            what="finalizer from op-a",
        )
        assert lease_spec(server)["holderIdentity"] == "op-a"
        assert not b.leading and b.proc.poll() is None
        assert not (tmp_path / "b" / "store.db").exists()  # the standby started nothing
        assert (tmp_path / "a" / "store.db").exists()

        a.stop(signal.SIGKILL)  # no release: b must wait the lease out
        last_renewal = parse_time(lease_spec(server)["renewTime"])
        b.wait_leading(timeout=60)
        spec = lease_spec(server)
        assert spec["holderIdentity"] == "op-b" and spec["leaseTransitions"] == 1
        takeover = parse_time(spec["acquireTime"]) - last_renewal
        print(f"takeover {takeover:.2f} s after the last renewal (lease {LEASE_SECONDS} s)")
        assert LEASE_SECONDS <= takeover <= LEASE_SECONDS + 4 * RETRY_SECONDS + 1.0  # loaded box

        # b acts: it re-applies what Kubernetes holds, and serves a new object
        second = EXAMPLE.read_text().replace("name: tiny-llama", "name: second")
        kubectl("apply", "-f", "-", stdin=second)
        wait_for(
            lambda: finalized(kubectl, "second"),
            timeout=60,
            interval=0.2,
            what="finalizer from op-b",
        )
        with Store(tmp_path / "b" / "store.db", readonly=True) as store:
            wait_for(
                lambda: {d.name for d in store.deployments()} == {"tiny-llama", "second"},
                timeout=60,
                interval=0.2,
            )
    finally:
        if b is not None:
            b.stop()
        a.stop()
    assert b.proc.returncode == 0


def b_log(tmp_path: Path) -> list[str]:
    path = tmp_path / "op-b.log"
    return path.read_text().splitlines() if path.exists() else []


# The inline bad cases of tests/test_spec.py through kubectl, with an operator running: each is
# refused by kubectl or the API server (schema, CEL, strict fields, ObjectMeta), or by the
# operator (what needs the operator's files: phase Failed, reason InvalidSpec, nothing stored),
# except these, which kubectl turns into a valid object before any server sees them:
KUBECTL_MAKES_VALID = {
    "duplicate-key": "kubectl keeps the last of two keys",
    "anchor-and-alias": "kubectl expands aliases (within its own bomb limit)",
    "custom-tag": "kubectl drops the tag and keeps the value",
    "multiple-documents": "kubectl applies each document",
    "over-1-mib": "the bulk is a comment kubectl drops",
    "status-present": "the status subresource drops status on create",
    "unknown-metadata-field": "metadata.uid is the server's: it sets its own",
}


def test_every_bad_case_is_refused_by_kubectl_the_server_or_the_operator(
    cluster: Any, tmp_path: Path
) -> None:
    from test_spec import BAD_CASES

    _, kubectl = cluster
    operator = OperatorProcess(kubectl.config, tmp_path / "state", "op-a", "--racks=0")
    refused_by_operator: list[str] = []
    accepted: list[str] = []
    try:
        operator.wait_leading()
        for case in BAD_CASES:
            text = (
                case.text.decode("utf-8", "replace") if isinstance(case.text, bytes) else case.text
            )
            out = kubectl.run("apply", "-f", "-", stdin=text)
            assert "Traceback" not in out.stderr
            if out.returncode != 0:
                continue
            names = [line.split()[0].split("/")[1] for line in out.stdout.splitlines() if line]
            if case.id in KUBECTL_MAKES_VALID:
                accepted.append(case.id)
            else:
                for name in names:
                    status = wait_for(
                        lambda n=name: (
                            json.loads(kubectl("get", "lpud", n, "-o", "json"))
                            .get("status", {})
                            .get("reason")
                        ),
                        timeout=60,
                        interval=0.2,
                        what=f"{case.id}: the operator's verdict",
                    )
                    assert status == "InvalidSpec", (case.id, status)
                refused_by_operator.append(case.id)
            kubectl("delete", "lpud", "--all", "--timeout=120s")
        with Store(tmp_path / "state" / "store.db", readonly=True) as store:
            assert (
                store.deployments() == []
            )  # every accepted object was deleted through the finalizer
    finally:
        operator.stop()
    assert sorted(accepted) == sorted(KUBECTL_MAKES_VALID)
    print(
        f"{len(BAD_CASES)} bad cases: {len(BAD_CASES) - len(accepted) - len(refused_by_operator)}"
        f" refused by kubectl or the server, {len(refused_by_operator)} by the operator, "
        f"{len(accepted)} made valid by kubectl"
    )
    assert len(refused_by_operator) >= 5


def test_a_leader_that_cannot_renew_stops_acting(cluster: Any, tmp_path: Path) -> None:
    """The API server refuses the holder's renewals: within the renew deadline it stops its
    control plane and exits 1 (the Deployment restarts it as a candidate)."""
    server, kubectl = cluster
    a = OperatorProcess(
        kubectl.config,
        tmp_path / "a",
        "op-a",
        "--lease-duration=4",
        "--renew-deadline=2",
        "--retry-period=0.25",
    )
    try:
        a.wait_leading()
        refused = time.monotonic()
        server.fail(1_000_000, 500, "/leases/lockstep-operator")
        a.proc.wait(60)
        assert a.proc.returncode == 1
        assert time.monotonic() - refused < 2 + 15  # the deadline, plus a stop on a busy box
        assert "lost the lease" in (tmp_path / "op-a.log").read_text()
    finally:
        a.stop()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--retry-period=5", "--renew-deadline=3"], "--retry-period < --renew-deadline"),
        (["--kubeconfig=/nonexistent"], "cannot load the Kubernetes configuration"),
    ],
)
def test_operator_refuses_bad_arguments(args: list[str], fragment: str, tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.operator",
            "--identity=x",
            f"--state={tmp_path}",
            *args,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2 and fragment in out.stderr
    assert "Traceback" not in out.stderr
