"""Helpers for agent tests: agent processes on loopback, test shards, polling with deadlines.

A plain module (tests import it by name: pytest puts `tests/` on the path). What has a set-up
and a teardown is a fixture in `tests/conftest.py`: the session's certificates
(`session_certs`) and agent clusters (`agent_cluster` per module, `fresh_agent_cluster` per
test), which terminate and reap every agent they started, even on failure. This module holds
the classes those fixtures hand out and pure helpers (shards, streams, polling, threads).

Agents speak mutual TLS by default, with certificates from one cluster CA made once per test
session; the test's channels use the control-plane certificate (`AgentProcess.dial` opens one
as another identity). A test that needs plaintext says so (`start(..., insecure=True)`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import selectors
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from safetensors.numpy import save

from orchestrator import agent_client
from placement.models import MODEL_PRESETS
from placement.planner import PlanRequest
from protos import agent_pb2, agent_pb2_grpc
from security import certs as certs_mod
from security.identity import CONTROL_PLANE, agent_identity, dns_name
from shardformat.address import shard_id_of
from shardformat.manifest import MANIFEST_KEY, Manifest, TensorInfo

ROOT = Path(__file__).resolve().parent.parent
STARTUP_SECONDS = 20.0
T = TypeVar("T")


def wait_for(
    probe: Callable[[], T],
    *,
    timeout: float = 10.0,
    interval: float = 0.01,
    what: str = "condition",
) -> T:
    """Poll `probe` until it returns something truthy; fail with its last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last: {value!r}")
        time.sleep(interval)


def credentials(certs: Path, identity: str = CONTROL_PLANE) -> certs_mod.Credentials:
    """`identity`'s credentials from the CA in `certs` (issued on first use)."""
    certs_mod.issue(certs, identity)
    return certs_mod.load(certs, identity)


@dataclass
class AgentProcess:
    """One `python -m agents.main` process and a channel to it (as the control plane)."""

    node: str
    proc: subprocess.Popen[str]
    address: str
    stderr_path: Path
    certs: Path
    insecure: bool = False
    channel: grpc.Channel = field(init=False)
    stub: agent_pb2_grpc.AgentStub = field(init=False)

    def __post_init__(self) -> None:
        if self.insecure:
            self.channel = agent_client.dial(self.address, None)
        else:
            self.channel = self.dial()
        self.stub = agent_pb2_grpc.AgentStub(self.channel)

    def dial(self, *, identity: str = CONTROL_PLANE, node: str | None = "") -> grpc.Channel:
        """A new mutual-TLS channel to this agent dialling as `identity` (from the session CA),
        expecting the certificate of `node` (default: this agent's; None: any agent)."""
        expected = self.node if node == "" else node
        return agent_client.dial(self.address, credentials(self.certs, identity), expected)

    @property
    def identity(self) -> str:
        return agent_identity(self.node)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> agent_pb2.StatusResponse:
        return self.stub.Status(agent_pb2.StatusRequest(), timeout=10)

    def chip(self, index: int) -> agent_pb2.ChipStatus:
        return self.status().chips[index]

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        self.channel.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class AgentCluster:
    """Starts agents with the certificates in `certs`; `close()` stops and reaps every one of
    them (the `agent_cluster` fixtures call it)."""

    def __init__(self, certs: Path) -> None:
        self.certs = certs
        self.agents: list[AgentProcess] = []
        self._tmp = tempfile.TemporaryDirectory(prefix="lockstep-agents-")

    def start(
        self,
        node: str,
        *,
        chips: int = 8,
        profile: str = "dev",
        extra: Sequence[str] = (),
        insecure: bool = False,
    ) -> AgentProcess:
        security = ["--insecure"] if insecure else ["--certs", str(self.certs)]
        err_path = Path(self._tmp.name) / f"{node.replace('/', '.')}.stderr"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "agents.main",
                    "--node",
                    node,
                    "--chips",
                    str(chips),
                    "--profile",
                    profile,
                    "--listen",
                    "127.0.0.1:0",
                    *security,
                    *extra,
                ],
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        try:
            line = read_line(proc, STARTUP_SECONDS)
            if not line.startswith("listening on 127.0.0.1:"):
                raise AssertionError(
                    f"agent {node} printed {line!r}; stderr:\n{err_path.read_text()}"
                )
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        address = line.removeprefix("listening on ")
        agent = AgentProcess(node, proc, address, err_path, self.certs, insecure)
        self.agents.append(agent)
        return agent

    def nodes(self) -> dict[str, str]:
        """Address → node name of every agent (`bring_up_replica(..., nodes=...)`)."""
        return {a.address: a.node for a in self.agents}

    def channels(self) -> dict[str, grpc.Channel]:
        """Address → the control plane's channel of every agent (`bring_up_replica`)."""
        return {a.address: a.channel for a in self.agents}

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
        self.agents.clear()
        self._tmp.cleanup()


def read_line(proc: subprocess.Popen[str], timeout: float) -> str:
    """The next stdout line of `proc`, failing at the deadline or if the process exits."""
    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise AssertionError(f"no output within {timeout} s (exit code {proc.poll()})")
    return proc.stdout.readline().strip()


# --- shards ---------------------------------------------------------------------------------


def sample_manifest(tensors: dict[str, TensorInfo], **fields: Any) -> Manifest:
    """A well-formed manifest (tiny-llama, no ops) listing `tensors`; `fields` override."""
    base = Manifest(
        model_name="tiny-llama",
        config=MODEL_PRESETS["tiny-llama"],
        precision="fp16",
        stage=0,
        stages=1,
        tick_offset=0,
        tp_rank=0,
        tp_size=1,
        max_batch=1,
        max_context=16,
        ops=(),
        tensors=tensors,
    )
    return dataclasses.replace(base, **fields)


def make_shard(nbytes: int, seed: int = 0, **manifest: Any) -> bytes:
    """A real safetensors blob with one uint8 tensor of `nbytes` and a Lockstep manifest."""
    weights = np.random.default_rng(seed).integers(0, 256, size=nbytes, dtype=np.uint8)
    info = TensorInfo("U8", (nbytes,), "w", None, (0, 0), hashlib.sha256(weights).hexdigest())
    meta = sample_manifest({"w": info}, **manifest)
    return save({"w": weights}, metadata={MANIFEST_KEY: meta.to_json()})


def make_virtual_shard(declared_bytes: int, seed: int = 0) -> bytes:
    """A manifest-only blob standing in for `declared_bytes` of weights."""
    info = TensorInfo("I8", (seed + 1,), "w", None, (0, 0), None)
    meta = sample_manifest({"w": info}, virtual=True, declared_bytes=declared_bytes)
    return save({}, metadata={MANIFEST_KEY: meta.to_json()})


def messages(
    blob: bytes, chip: int, *, chunk: int = 256 << 10, algorithm: str = "blake3", **header: Any
) -> list[bytes]:
    """A pre-framed load stream of `blob` onto `chip` (256 KiB chunks: several per test blob)."""
    return agent_client.blob_messages(blob, chip, chunk_bytes=chunk, algorithm=algorithm, **header)


def load(agent: AgentProcess, blob: bytes, chip: int, **kwargs: Any) -> agent_pb2.LoadShardResponse:
    return agent_client.send_load(agent.channel, messages(blob, chip, **kwargs), timeout=30)


def shard_id(blob: bytes) -> str:
    """The shard id of a blob: its BLAKE3."""
    return shard_id_of(blob)


class PausedStream:
    """A request iterator that stops after `pause_after` messages until `resume()`."""

    def __init__(self, items: Sequence[bytes], pause_after: int) -> None:
        self._items = list(items)
        self._pause_after = pause_after
        self.paused = threading.Event()
        self._resume = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        for i, item in enumerate(self._items):
            if i == self._pause_after:
                self.paused.set()
                self._resume.wait(30)
            yield item

    def resume(self) -> None:
        self._resume.set()


def run_in_threads(
    target: Callable[..., object], jobs: Sequence[tuple[Any, ...]], timeout: float = 60.0
) -> None:
    """Run `target(*job)` for every job, each in its own thread; fail if a thread is still
    running after `timeout` seconds, and re-raise the first exception a thread raised."""
    errors: list[BaseException] = []

    def wrapped(*args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:  # re-raised by the calling thread
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=job, daemon=True) for job in jobs]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t.name for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} thread(s) still running after {timeout} s: {alive}"
    if errors:
        if len(errors) > 1:
            errors[0].add_note(f"and {len(errors) - 1} more thread(s) failed: {errors[1:]!r}")
        raise errors[0]


def tiny_request(name: str, *, tp: int = 1, stages: int | None = None) -> PlanRequest:
    """The one-replica tiny-llama request the agent tests compile (context 64, batch 4)."""
    return PlanRequest(
        name,
        MODEL_PRESETS["tiny-llama"],
        "fp16",
        replicas=1,
        max_context=64,
        max_batch=4,
        tensor_parallel=tp,
        pipeline_stages=stages,
        spread="none",
        spares_per_rack=0,
    )


class Waiting:
    """A Generate call admitted on `deployment` and waiting in a thread; `result()` gives its
    error (None: it finished) and when it ended, so a test can check a client was ended at
    once rather than at its deadline."""

    def __init__(self, agent: AgentProcess, deployment: str) -> None:
        request = agent_pb2.GenerateRequest(
            deployment=deployment, request_id="waiter", prompt_ids=[1, 2, 3], max_tokens=4
        )
        self.call = agent.stub.Generate(request, timeout=60)
        self.call.initial_metadata()  # admitted
        self.error: grpc.RpcError | None = None
        self.ended = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            list(self.call)
        except grpc.RpcError as exc:
            self.error = exc
        self.ended = time.monotonic()

    def result(self) -> tuple[grpc.RpcError | None, float]:
        self._thread.join(60)
        return self.error, self.ended

    def cancel(self) -> None:
        self.call.cancel()
        self._thread.join(60)


def scrape(agent: AgentProcess, certs: Path) -> dict[tuple[str, tuple[str, ...]], float]:
    """GET the agent's /metrics over TLS, checking the server is this agent (name and cluster
    CA); (sample name, label values sorted by label name) -> value."""
    port = agent.status().metrics_port
    assert port > 0
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    host = agent.address.rsplit(":", 1)[0]
    with (
        socket.create_connection((host, port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=dns_name(agent.identity)) as tls,
    ):
        tls.sendall(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return parse_metrics(body.decode())


def parse_metrics(text: str) -> dict[tuple[str, tuple[str, ...]], float]:
    """(sample name, label values sorted by label name) -> value."""
    return {
        (s.name, tuple(v for _, v in sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
