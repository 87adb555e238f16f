"""Control-plane load at full size (issue 12): `python -m bench.control_plane --only scale`.

Three processes, so the control plane's CPU is its own:

* **the control plane** (`python -m bench.cp_scale serve STATE`): the real `ControlPlane`
  of `orchestrator.control_plane` — store, controller passes, admin API, node registry,
  metrics server, verification loop and supervisor — started through its own `start()`, with
  a runtime that starts no agents (the nodes register by themselves, like agents of a
  DaemonSet). Profile `groq-rack` (8 chips a node, 9 nodes a rack), default `CoreSettings`.
* **the fleet driver** (`python -m bench.cp_scale drive ...`): on one asyncio loop, for each
  node its own mutual-TLS channel with its own agent certificate, a `Register` and a
  long-lived `HeartbeatStream`, then a beat per node every `--interval` (1 s), the nodes'
  phases spread evenly over the interval (agents start at random times). Nodes are added on
  command, so one control plane is measured at several sizes in one run. The agents'
  addresses lead nowhere (the controller's `Status` after a registration fails once, fast).
* **this process**: CPU of the control-plane process from `/proc/PID/stat` (user + system)
  in `--windows` windows of `--window` seconds at each node count, median of the windows as a
  fraction of one core; at the largest count also heartbeat-to-state lag, `ListNodes` and a
  bare unary gRPC call (health Check) on the same admin server, and `lpuctl get nodes` as a
  subprocess (Python start-up and imports included).

Heartbeat-to-state lag: while the driver records every beat's send time (wall clock, same
machine), this process reads the store's `nodes.last_heartbeat` (a read-only connection, as
`lpuctl` or a second reader would) every `POLL_S`; a beat's lag is the time from its send to
the first read whose `last_heartbeat` for that node is at least the send time (the registry
stamps a beat with its receipt time, which is later). Resolution: one poll (`POLL_S`).
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.05
SLICES = 20  # the driver beats its nodes in this many slices of the interval
RACK_NODES = 9  # groq-rack


def _names(count: int) -> list[tuple[str, str, int]]:
    from orchestrator.core import node_name

    return [
        (node_name(f"rack-{i // RACK_NODES}", i % RACK_NODES), f"rack-{i // RACK_NODES}", i % 9)
        for i in range(count)
    ]


# --- the control plane -------------------------------------------------------------------------


class _NoAgents:
    """A runtime that starts nothing: the driver's nodes register by themselves."""

    def start_agents(self, nodes: Any) -> list[Any]:
        return []

    def dead_agents(self) -> list[str]:
        return []

    def stop(self) -> None:
        pass


def serve(state: str, profile: str) -> None:
    import logging

    from orchestrator import control_plane

    logging.basicConfig(level=logging.ERROR)
    control_plane.tune_interpreter()  # as `python -m orchestrator.control_plane` does
    control_plane.make_runtime = lambda *a, **k: _NoAgents()
    plane = control_plane.ControlPlane(state, profile=profile, racks=0, nodes_per_rack=0)
    plane.start()
    print(
        json.dumps(
            {
                "pid": os.getpid(),
                "admin": plane.servers.admin_port,
                "registry": plane.servers.registry_port,
            }
        ),
        flush=True,
    )
    controller = plane.controller
    while sys.stdin.readline().strip() == "stats":  # EOF or another line: stop
        stats = {"passes": controller.passes, "ticks": controller.ticks}
        print(json.dumps({**stats, "reasons": dict(controller.pass_reasons)}), flush=True)
    plane.stop()


# --- the fleet driver ----------------------------------------------------------------------------


async def _drive(
    certdir: str, registry: str, interval: float, chips: int, sram: int, count: int
) -> None:
    import grpc
    import grpc.aio

    from protos import admin_pb2, admin_pb2_grpc
    from security import certs
    from security.identity import CONTROL_PLANE
    from security.tls import channel_credentials, target_options

    loop = asyncio.get_running_loop()
    calls: list[Any] = []  # (index, stream call)
    channels: list[Any] = []
    recording: list[list[float]] | None = None
    beat = admin_pb2.HeartbeatRequest().SerializeToString()
    late = 0

    async def add_one(index: int, name: str, rack: str, slot: int) -> None:
        channel = grpc.aio.secure_channel(
            registry,
            channel_credentials(certs.load_agent(certdir, name)),
            options=[("grpc.use_local_subchannel_pool", 1), *target_options(CONTROL_PLANE)],
        )
        registry_stub = admin_pb2_grpc.NodeRegistryStub(channel)
        await registry_stub.Register(
            admin_pb2.RegisterRequest(
                node=name,
                rack=rack,
                slot=slot,
                address="127.0.0.1:1",  # nothing listens: the control plane's Status fails fast
                profile="groq-rack",
                chips=[admin_pb2.RegisteredChip(index=c, sram_bytes=sram) for c in range(chips)],
            ),
            timeout=120,
        )
        call = registry_stub.HeartbeatStream()
        await call.write(admin_pb2.HeartbeatRequest(node=name))
        channels.append(channel)
        calls.append((index, call))

    async def beater() -> None:
        nonlocal late
        tick = loop.time()
        step = interval / SLICES
        n = 0
        while True:
            part = n % SLICES
            n += 1
            now = time.time()
            for index, call in calls:
                if index % SLICES == part:
                    await call.write(beat)
                    if recording is not None:
                        recording[index].append(now)
            tick += step
            pause = tick - loop.time()
            if pause > 0:
                await asyncio.sleep(pause)
            else:
                late += 1

    task = loop.create_task(beater())
    nodes = _names(count)
    added = 0
    while True:
        line = (await loop.run_in_executor(None, sys.stdin.readline)).split()
        if not line or line[0] == "quit":
            break
        if line[0] == "add":
            upto = min(len(nodes), added + int(line[1]))
            for start in range(added, upto, 64):  # registrations 64 at a time
                batch = range(start, min(upto, start + 64))
                await asyncio.gather(*(add_one(i, *nodes[i]) for i in batch))
            added = upto
            print(f"added {added}", flush=True)
        elif line[0] == "record":
            recording = [[] for _ in nodes]
            print("recording", flush=True)
        elif line[0] == "dump":
            out, recording = recording or [], None
            sends = {nodes[i][0]: times for i, times in enumerate(out) if times}
            Path(line[1]).write_text(json.dumps(sends))
            print(f"dumped late={late}", flush=True)
    task.cancel()
    for _, call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()


# --- measuring -----------------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_windows(pid: int, windows: int, seconds: float) -> list[float]:
    """The process's CPU (fraction of one core) in `windows` consecutive windows."""
    out = []
    for _ in range(windows):
        c0, w0 = _cpu_seconds(pid), time.monotonic()
        time.sleep(seconds)
        out.append((_cpu_seconds(pid) - c0) / (time.monotonic() - w0))
    return out


def _lag(
    sends: dict[str, list[float]], polls: list[tuple[float, dict[str, float]]]
) -> dict[str, Any]:
    """Each recorded beat's lag: from its send to the first poll that shows it (see the module
    docstring). Beats sent in the last 2 s of the recording are left out (no poll after)."""
    from bench.control_plane import _pct

    if not polls:
        return {}
    end = polls[-1][0] - 2.0
    lags: list[float] = []
    unseen = 0
    for node, times in sends.items():
        i = 0
        for sent in times:
            if sent > end:
                break
            while i < len(polls) and (polls[i][0] < sent or polls[i][1].get(node, 0.0) < sent):
                i += 1
            if i == len(polls):
                unseen += 1
                continue
            lags.append(polls[i][0] - sent)
    if not lags:
        return {"beats": 0, "unseen": unseen}
    return {
        "beats": len(lags),
        "unseen": unseen,
        "p50_ms": round(_pct(lags, 0.5) * 1e3, 1),
        "p99_ms": round(_pct(lags, 0.99) * 1e3, 1),
        "max_ms": round(max(lags) * 1e3, 1),
        "poll_ms": POLL_S * 1e3,
    }


def _poll_store(store_path: Path, seconds: float) -> list[tuple[float, dict[str, float]]]:
    import sqlite3

    conn = sqlite3.connect(f"file:{store_path}?mode=ro", uri=True, timeout=10)
    polls = []
    end = time.monotonic() + seconds
    try:
        while time.monotonic() < end:
            rows = conn.execute("SELECT name, last_heartbeat FROM nodes").fetchall()
            polls.append((time.time(), dict(rows)))
            time.sleep(POLL_S)
    finally:
        conn.close()
    return polls


def _lpuctl_get_nodes(server: str, ca: Path, token: str, runs: int) -> list[float]:
    lpuctl = Path(sys.executable).with_name("lpuctl")
    argv = [str(lpuctl), "get", "nodes", "--server", server, "--ca", str(ca), "--token", token]
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
        out.append(time.perf_counter() - t)
        if done.returncode != 0:
            raise RuntimeError(f"lpuctl get nodes: exit {done.returncode}: {done.stderr[-500:]}")
    lines = done.stdout.count("\n")
    print(f"  lpuctl get nodes printed {lines} lines", flush=True)
    return out


def measure_scale(
    counts: list[int],
    interval: float = 1.0,
    windows: int = 4,
    window: float = 5.0,
    lag_seconds: float = 20.0,
    cli_runs: int = 9,
    calls: int = 30,
) -> dict[str, Any]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from bench.control_plane import _admin_stub, _pct
    from orchestrator.control_plane import prepare_state, token_for
    from placement.profiles import get_profile
    from protos import admin_pb2
    from security import certs as certs_mod
    from security.identity import agent_identity

    profile = get_profile("groq-rack")
    top = max(counts)
    result: dict[str, Any] = {
        "nodes": top,
        "chips": top * profile.chips_per_node,
        "interval_s": interval,
        "windows": windows,
        "window_s": window,
    }
    with tempfile.TemporaryDirectory(prefix="cpscale-") as state:
        paths = prepare_state(state)
        t0 = time.perf_counter()
        for name, _, _ in _names(top):
            certs_mod.issue(paths.certs, agent_identity(name))
        result["cert_issue_s"] = round(time.perf_counter() - t0, 1)
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        server = subprocess.Popen(
            [sys.executable, "-m", "bench.cp_scale", "serve", state, "groq-rack"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        driver = None
        try:
            assert server.stdin is not None and server.stdout is not None
            ports = json.loads(server.stdout.readline())
            pid = ports["pid"]
            registry = f"127.0.0.1:{ports['registry']}"
            driver = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.cp_scale",
                    "drive",
                    str(paths.certs),
                    registry,
                    str(interval),
                    str(profile.chips_per_node),
                    str(profile.sram_bytes),
                    str(top),
                ],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            assert driver.stdin is not None and driver.stdout is not None

            def command(text: str) -> str:
                assert driver is not None and driver.stdin and driver.stdout
                driver.stdin.write(text + "\n")
                driver.stdin.flush()
                return driver.stdout.readline().strip()

            def stats() -> dict[str, Any]:
                assert server.stdin is not None and server.stdout is not None
                server.stdin.write("stats\n")
                server.stdin.flush()
                found: dict[str, Any] = json.loads(server.stdout.readline())
                return found

            cpu: list[list[float]] = []
            added = 0
            for count in sorted(counts):
                t = time.perf_counter()
                if count > added:
                    reply = command(f"add {count - added}")
                    assert reply == f"added {count}", reply
                    added = count
                add_s = time.perf_counter() - t
                time.sleep(3.0)  # the registrations' passes and refreshes settle
                before = stats()
                t = time.monotonic()
                samples = cpu_windows(pid, windows, window)
                after, span = stats(), time.monotonic() - t
                passes = (after["passes"] - before["passes"]) / span
                reasons = {
                    k: v - before["reasons"].get(k, 0)
                    for k, v in after["reasons"].items()
                    if v - before["reasons"].get(k, 0)
                }
                result.setdefault("full_passes_per_s", {})[str(count)] = round(passes, 3)
                result.setdefault("full_pass_reasons", {})[str(count)] = reasons
                core = statistics.median(samples)
                cpu.append([count, round(core, 4)])
                print(
                    f"  {count} nodes: control-plane CPU {core:.3f} core (windows "
                    f"{[round(s, 3) for s in samples]}), registering took {add_s:.1f} s; "
                    f"{passes:.2f} full passes a second {reasons}",
                    flush=True,
                )
                result.setdefault("cpu_windows", {})[str(count)] = [round(s, 4) for s in samples]
            result["cpu_vs_nodes"] = cpu

            # lag, at the largest count
            assert command("record") == "recording"
            polls = _poll_store(paths.store, lag_seconds)
            dump = Path(state) / "sends.json"
            reply = command(f"dump {dump}")
            result["driver_late_slices"] = int(reply.split("=")[1])
            result["lag"] = _lag(json.loads(dump.read_text()), polls)
            print(f"  heartbeat-to-state lag: {result['lag']}", flush=True)

            # reads, while every node beats
            stub, channel = _admin_stub(paths, f"127.0.0.1:{ports['admin']}")
            viewer = token_for(paths, "viewer")
            auth = (("authorization", f"Bearer {viewer}"),)
            health = health_pb2_grpc.HealthStub(channel)
            listed = stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=auth).nodes
            assert len(listed) == top, len(listed)
            result["nodes_ready"] = sum(1 for n in listed if n.state == "Ready")
            samples_ms: dict[str, list[float]] = {"list_nodes": [], "grpc_health": []}
            for _ in range(calls):
                t = time.perf_counter()
                stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=auth)
                samples_ms["list_nodes"].append((time.perf_counter() - t) * 1e3)
                t = time.perf_counter()
                health.Check(health_pb2.HealthCheckRequest(service=""))
                samples_ms["grpc_health"].append((time.perf_counter() - t) * 1e3)
                time.sleep(0.05)
            channel.close()
            cli = _lpuctl_get_nodes(
                f"127.0.0.1:{ports['admin']}", paths.certs / "ca.crt", viewer, cli_runs
            )
            result["p50_ms"] = {k: round(statistics.median(v), 2) for k, v in samples_ms.items()}
            result["p95_ms"] = {k: round(_pct(v, 0.95), 2) for k, v in samples_ms.items()}
            result["lpuctl_get_nodes_s"] = {
                "p50": round(statistics.median(cli), 3),
                "runs": [round(c, 3) for c in cli],
            }
            command("quit")
            driver.wait(60)
        finally:
            for proc in (driver, server):
                if proc is None:
                    continue
                if proc.poll() is None and proc.stdin is not None:
                    try:
                        proc.stdin.close()
                        proc.wait(30)
                    except (subprocess.TimeoutExpired, OSError):
                        pass
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    del grpc
    top_cpu = cpu[-1][1]
    baseline = cpu[0][1] if cpu[0][0] == 0 else None
    result["cpu_cores_at_top"] = top_cpu
    result["cpu_cores_at_0_nodes"] = baseline
    result["targets"] = {
        "cpu_cores": 0.5,
        "lag_p99_ms": 1000.0,
        "lpuctl_get_nodes_p50_s": 1.0,
    }
    result["meets_targets"] = {
        "cpu": top_cpu < 0.5,
        "lag": result["lag"].get("p99_ms", 1e9) < 1000.0,
        "lpuctl_get_nodes": result["lpuctl_get_nodes_s"]["p50"] < 1.0,
    }
    return result


def main() -> None:
    role = sys.argv[1]
    if role == "serve":
        serve(sys.argv[2], sys.argv[3])
    elif role == "drive":
        certdir, registry, interval, chips, sram, count = sys.argv[2:8]
        asyncio.run(_drive(certdir, registry, float(interval), int(chips), int(sram), int(count)))
    else:
        raise SystemExit(f"usage: python -m bench.cp_scale serve|drive ... (not {role!r})")


if __name__ == "__main__":
    main()
