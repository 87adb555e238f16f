"""Silent-data-corruption canary benchmark (issue 10). The last line of output is one JSON object.

Sections:

* `verify`: an embedded `ControlPlane` (2 racks x 3 `dev` nodes, mTLS process agents started
  with `--allow-fault-injection`) in this process, tiny-llama with 2 replicas and periodic
  verification off. `--reps` admin `Verify` calls (the canary: 8 prompt tokens, 4 generated,
  through both replicas at once, then every agent's StageDigests and the judgement): wall time
  per call. Baseline in the same run: an admin `Generate` of the same request, which is what
  a canary costs a replica at least; the difference is the digest collection and judgement.
* `detect`: one bit flipped in replica 1's stage 1 (InjectFault), then Verify: the wall time
  of the Verify that found and fenced it, and from then until the deployment is Ready 2/2
  again on other chips (the existing chip-failure path).
* `digest`: the per-tick cost of the request digest every stage computes for all traffic
  (`agents.pipeline.request_digest`: header parse + sha256 without the slot tensor; the hash
  chain links it, so it replaces the plain sha256 of the payload the chain took before),
  against that plain sha256;
  tiny-llama's hidden size (decode: 1 row; prefill: 64 rows) and Llama-3-70B's (8192; 1 and
  128 rows).

Run: `.venv/bin/python -m bench.verify [--reps 20]`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from agents.activation import Activation
from agents.pipeline import encode_work, request_digest
from agents.sampling import GREEDY
from bench.control_plane import EXAMPLE, _admin_stub, _pct, _poll
from orchestrator.agent_client import dial
from orchestrator.control_plane import ControlPlane, token_for
from orchestrator.verify import CANARY_PROMPT
from protos import admin_pb2, agent_pb2, agent_pb2_grpc
from security.certs import load_control_plane

NAME = "tiny-llama"


def _stats(values: list[float]) -> dict[str, float]:
    return {
        "p50_ms": statistics.median(values) * 1e3,
        "p95_ms": _pct(values, 0.95) * 1e3,
        "min_ms": min(values) * 1e3,
        "n": len(values),
    }


def measure_cluster(reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="verifybench-") as state:
        plane = ControlPlane(state, allow_fault_injection=True)
        try:
            plane.start()
            stub, channel = _admin_stub(plane.paths, plane.admin_address)
            auth = (("authorization", f"Bearer {token_for(plane.paths, 'admin')}"),)
            manifest = EXAMPLE.read_text() + "  verification: {intervalSeconds: 0}\n"
            stub.Apply(admin_pb2.ApplyRequest(yaml=manifest, source="bench"), metadata=auth)

            def ready() -> bool:
                d = stub.Get(admin_pb2.GetRequest(name=NAME), metadata=auth)
                return bool(d.phase == "Ready" and d.ready_replicas == d.replicas)

            _poll(ready, 180, "Ready", 0.05)
            verify_s, generate_s, server_s = [], [], []
            for _ in range(reps):
                t = time.perf_counter()
                report = stub.Verify(admin_pb2.VerifyRequest(deployment=NAME), metadata=auth)
                verify_s.append(time.perf_counter() - t)
                server_s.append(report.seconds)
                if not report.passed:
                    raise RuntimeError(f"a clean verify failed: {report.message}")
                t = time.perf_counter()
                list(
                    stub.Generate(
                        admin_pb2.GenerateRequest(
                            deployment=NAME, prompt_ids=list(CANARY_PROMPT), max_tokens=4
                        ),
                        metadata=auth,
                    )
                )
                generate_s.append(time.perf_counter() - t)
            detect = _detect(plane, stub, auth)
            channel.close()
        finally:
            plane.stop()
    return {
        "verify": _stats(verify_s),
        "verify_server": _stats(server_s),
        "generate_same_request": _stats(generate_s),
        "detect": detect,
    }


def _detect(plane: ControlPlane, stub: Any, auth: Any) -> dict[str, Any]:
    creds = load_control_plane(plane.paths.certs)
    nodes = stub.ListNodes(admin_pb2.ListNodesRequest(), metadata=auth).nodes
    for node in nodes:
        agent = agent_pb2_grpc.AgentStub(dial(node.address, creds, node.name))
        for chip in agent.Status(agent_pb2.StatusRequest()).chips:
            for p in chip.pipelines:
                if (p.deployment, p.replica, p.stage) == (NAME, 1, 1):
                    agent.InjectFault(
                        agent_pb2.InjectFaultRequest(
                            deployment=NAME, replica=1, stage=1, from_tick=p.tick + 1, bit=9
                        )
                    )
                    t = time.perf_counter()
                    report = stub.Verify(admin_pb2.VerifyRequest(deployment=NAME), metadata=auth)
                    found = time.perf_counter() - t

                    def ready(want: bool = True) -> bool:
                        d = stub.Get(admin_pb2.GetRequest(name=NAME), metadata=auth)
                        ok = d.phase == "Ready" and d.ready_replicas == d.replicas
                        return bool(ok == want)

                    _poll(lambda: ready(False), 60, "the replica to leave Ready", 0.01)
                    _poll(ready, 180, "Ready again", 0.02)
                    return {
                        "detected": not report.passed and bool(report.divergences),
                        "message": report.message,
                        "verify_ms": found * 1e3,
                        "ready_again_s": time.perf_counter() - t - found,
                    }
    raise RuntimeError("no agent runs replica 1 stage 1")


def measure_digest(reps: int) -> dict[str, Any]:
    out = {}
    for label, hidden, rows in (
        ("tiny_decode", 256, 1),
        ("tiny_prefill64", 256, 64),
        ("70b_decode", 8192, 1),
        ("70b_prefill128", 8192, 128),
    ):
        act = Activation(
            slots=np.zeros(rows, dtype=np.int32),
            positions=np.arange(rows, dtype=np.int32),
            tokens=np.arange(rows, dtype=np.int32),
            hidden=np.random.default_rng(0).standard_normal((rows, hidden), dtype=np.float32),
        )
        payload = encode_work(GREEDY, rows - 1, act)
        timings = {}
        for what, fn in (
            ("request_digest", lambda p=payload: request_digest(p, False)),
            ("sha256", lambda p=payload: hashlib.sha256(p).digest()),
        ):
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t)
            timings[f"{what}_us"] = statistics.median(samples) * 1e6
        out[label] = {"payload_bytes": len(payload), **timings}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    digest = measure_digest(200)
    for label, row in digest.items():
        print(
            f"digest {label:15s} {row['payload_bytes']:>9,} B  request digest "
            f"{row['request_digest_us']:8.1f} us  sha256 alone {row['sha256_us']:8.1f} us"
        )
    cluster = measure_cluster(args.reps)
    for key in ("verify", "verify_server", "generate_same_request"):
        s = cluster[key]
        print(f"{key:22s} p50 {s['p50_ms']:7.1f} ms  p95 {s['p95_ms']:7.1f} ms  (n={s['n']})")
    d = cluster["detect"]
    print(
        f"detect: {d['detected']} in {d['verify_ms']:.0f} ms ({d['message']}); "
        f"Ready again after {d['ready_again_s']:.2f} s"
    )
    print(json.dumps({"digest": digest, **cluster}, sort_keys=True))


if __name__ == "__main__":
    main()
