"""Ray as the engine: embedded start-up, agent actors started and restarted, compile fan-out.

Measures, on the embedded default (a local Ray with two CPUs):

* `ray_init_s`: starting the embedded Ray (`RayRuntime` with no Ray running yet);
* `actor_start_s`: `start_agents` for `--agents` nodes, until every agent serves (mTLS);
* restarts (`--restarts` times): SIGKILL an agent's process, then the time until
  `dead_agents()` reports it and until the restarted agent answers Status on its new address;
* compile fan-out: the same plan compiled in process and over Ray tasks into fresh stores
  (after a warm-up compile, so Ray workers have imported the compiler), checked shard for shard
  equal. Two workloads: real int8 shards of a seeded `--model` (one per pipeline stage on the
  `dev-whole-ops` profile: the work is generating, quantizing, hashing and writing weights), and
  the 405B plan's 2,036 virtual (manifest-only) shards, where the driver's program building
  (done in process in both modes) and per-blob file creation dominate.

The last line of output is one JSON object. Run: `.venv/bin/python -m bench.ray_engine`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from orchestrator.agent_client import dial
from orchestrator.compiler import compile_plan
from orchestrator.ray_runtime import RayRuntime
from orchestrator.ray_tasks import compile_plan_ray
from orchestrator.runtime import AgentHandle, NodeSpec
from placement.models import MODEL_PRESETS
from placement.plan import Plan
from placement.planner import PlanRequest, make_plan
from placement.topology import preset_topology
from protos import agent_pb2, agent_pb2_grpc
from security import certs as certs_mod


def _status_ok(handle: AgentHandle, certs: Path) -> bool:
    channel = dial(handle.address, certs_mod.load_control_plane(certs), handle.node)
    try:
        agent_pb2_grpc.AgentStub(channel).Status(agent_pb2.StatusRequest(), timeout=10)
        return True
    finally:
        channel.close()


def _poll(probe: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError("timed out")


def measure_actors(rt: RayRuntime, certs: Path, agents: int, restarts: int) -> dict[str, Any]:
    nodes = [NodeSpec(f"rack-0/node-{i}", "rack-0", i, 8, "dev") for i in range(agents)]
    started = time.perf_counter()
    handles = rt.start_agents(nodes)
    start_s = time.perf_counter() - started
    assert all(_status_ok(h, certs) for h in handles)
    reported, serving = [], []
    for round_ in range(restarts):
        node = nodes[round_ % agents].name
        pid = rt.process_id(node)
        assert pid is not None
        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        _poll(lambda n=node: n in rt.dead_agents())  # type: ignore[misc]
        reported.append(time.perf_counter() - killed)
        handle = _poll(lambda n=node: rt.handle(n))  # type: ignore[misc]
        assert _status_ok(handle, certs)
        serving.append(time.perf_counter() - killed)
        print(f"restart {round_}: reported {reported[-1]:.2f} s, serving {serving[-1]:.2f} s")
    return {
        "agents": agents,
        "actor_start_s": round(start_s, 3),
        "restarts": restarts,
        "restart_reported_s_p50": round(statistics.median(reported), 3),
        "restart_serving_s_p50": round(statistics.median(serving), 3),
        "restart_serving_s_max": round(max(serving), 3),
    }


def _plan(model: str, profile: str, racks: int, **extra: Any) -> Plan:
    request = PlanRequest("bench", MODEL_PRESETS[model], "int8", replicas=1, **extra)
    return make_plan(request, preset_topology(racks, profile))


def measure_compile(
    name: str, plan: Plan, source: int | None, work: Path, repeats: int = 2
) -> dict[str, Any]:
    """Best of `repeats` alternating runs each way, every run into a fresh store (the machine
    is shared: the best run is the one least disturbed)."""
    cfg = MODEL_PRESETS[plan.model]
    virtual = source is None
    local_times, ray_times = [], []
    for run in range(repeats):
        started = time.perf_counter()
        local = compile_plan(plan, cfg, source, work / f"{name}-local-{run}", virtual=virtual)
        local_times.append(time.perf_counter() - started)
        started = time.perf_counter()
        fanned = compile_plan_ray(plan, cfg, source, work / f"{name}-ray-{run}", virtual=virtual)
        ray_times.append(time.perf_counter() - started)
    local_s, ray_s = min(local_times), min(ray_times)
    identical = [(r.chip, r.shard_id, r.size_bytes) for r in fanned] == [
        (r.chip, r.shard_id, r.size_bytes) for r in local
    ]
    row = {
        "workload": name,
        "shards": len(local),
        "distinct": len({r.shard_id for r in local}),
        "bytes": sum({r.shard_id: r.size_bytes for r in local}.values()),
        "largest_shard_bytes": max(r.size_bytes for r in local),
        "in_process_s": round(local_s, 3),
        "ray_s": round(ray_s, 3),
        "speedup": round(local_s / ray_s, 2),
        "runs_in_process_s": [round(t, 2) for t in local_times],
        "runs_ray_s": [round(t, 2) for t in ray_times],
        "identical": identical,
    }
    print(
        f"compile {name}: {row['shards']} shards ({row['distinct']} distinct, "
        f"{row['bytes'] / 1e6:.0f} MB): in process {local_s:.2f} s, Ray tasks {ray_s:.2f} s, "
        f"x{row['speedup']}, identical={identical}"
    )
    return row


def measure_ray(
    agents: int = 4, restarts: int = 3, model: str = "qwen2.5-0.5b", real: bool = True
) -> dict[str, Any]:
    """Every figure of this module (see its docstring) as one dict; starts and stops its own
    embedded Ray (none may be running)."""
    with tempfile.TemporaryDirectory(prefix="lockstep-bench-ray-") as tmp:
        work = Path(tmp)
        certs = work / "certs"
        certs_mod.init_cluster(certs)
        started = time.perf_counter()
        rt = RayRuntime(certs)
        init_s = time.perf_counter() - started
        print(f"embedded Ray started in {init_s:.2f} s")
        try:
            result: dict[str, Any] = {"ray_init_s": round(init_s, 3)}
            result |= measure_actors(rt, certs, agents, restarts)
            print(
                f"{agents} agent actors serving in {result['actor_start_s']:.2f} s; restart "
                f"p50: reported {result['restart_reported_s_p50']:.2f} s, serving "
                f"{result['restart_serving_s_p50']:.2f} s"
            )
            # warm-up: Ray workers import numpy and the compiler once
            compile_plan_ray(
                _plan("tiny-llama", "dev", 2, max_context=64, max_batch=1),
                MODEL_PRESETS["tiny-llama"],
                1,
                work / "warmup",
            )
            rows = []
            if real:
                plan = _plan(
                    model,
                    "dev-whole-ops",
                    4,
                    max_context=256,
                    max_batch=1,
                    spread="none",
                    spares_per_rack=0,
                )
                rows.append(measure_compile(f"{model}-int8-real", plan, 3, work))
            virtual = _plan("llama-3.1-405b", "groq-rack", 145, max_context=4096, max_batch=8)
            rows.append(measure_compile("llama-3.1-405b-int8-virtual", virtual, None, work))
            result["compile"] = rows
            return result
        finally:
            rt.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--agents", type=int, default=4)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--model", default="qwen2.5-0.5b", help="seeded model for real shards")
    parser.add_argument("--skip-real", action="store_true", help="only the virtual 405B compile")
    args = parser.parse_args()
    result = measure_ray(args.agents, args.restarts, args.model, not args.skip_real)
    sys.stdout.flush()
    print(json.dumps({"bench": "ray_engine"} | result))


if __name__ == "__main__":
    main()
