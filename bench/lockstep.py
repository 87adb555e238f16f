"""Lockstep pipeline benchmark: link hop latency, and tokens/s through 1, 2, 4, 8 stages.

In one run, on loopback:

* hop latency: agent A sends 16 KiB frames (a typical activation) one at a time over a Link
  stream to agent B (`LinkPing`), each waiting for its acknowledgement. The hop is send →
  frame received and its checksum verified by B's link service, timed on the host-wide
  monotonic clock both processes share; the round trip (frame + ack) is reported beside it.
* serving: tiny-llama (seeded weights) re-cut into 1, 2, 4 and 8 whole-op stages, stage s on
  agent A when s < S/2 else agent B (so the ring has in-process and network links), served
  through `Generate` on stage 0's agent: one request, then maxBatch requests at once. The
  single-process `ReferenceExecutor` generates the same requests in this process (one
  request; and the batch as one batched `generate` call) for the ratio, sampled once per rep
  of every stage count, in turn with the pipelines, so that it sees the same machine load.
  Note what that ratio compares: an in-process reference with no gRPC against a
  multi-process gRPC pipeline (the JSON says so in `reference_kind`), so it is the
  pipeline's overhead, not a stage speedup.
* identity: every pipeline's tokens and logits (streamed with `return_logits`) are compared
  bit for bit with the reference's; `bit_identical_to_reference` is computed here. A request
  that fails or returns nothing fails the whole run (exit status 1, the reason on stderr).

Everything above runs twice in the same run: on a pair of agents speaking mutual TLS (the
default; a CA made for the run, this process dialling as the control plane, the agents' links
authenticated by certificate and link secret) and on a pair started with `--insecure`. The
headline figures are the TLS ones; `plaintext` and `tls_cost_ratio` (TLS / plaintext for
latencies, plaintext / TLS for rates: above 1 means TLS is slower) give the cost.

And on each pair, for both link transports: the gRPC Link stream (the top-level figures, as
before) and the framed transport (`agents.wire`, under `framed`): hop latency (LinkPing with
`transport` FRAMED) and the 1/2/4/8-stage tokens/s with every replica's links forced to it
(`ConfigureReplica.link_transport`). The baseline of the issue is measured in the same run: a
raw round trip (16 KiB frame with an 8-byte length, 8-byte ack back) between this process and
an echo process, over plain TCP and over TLS 1.3 (Python `ssl`, the cluster's certificates),
one blocking socket each side. `framed.vs_raw` divides the framed hop (one way, as the issue
states its target) and the framed round trip by the raw round trip of the same security:
TLS by raw TLS, plaintext by raw TCP; `within_2x` is the hop test of the issue.

Medians over `--reps`. Prints a table, then one JSON line (last). Both agents and this
process share the machine's cores, so multi-stage figures include that contention.

Run: `.venv/bin/python -m bench.lockstep [--reps 3] [--tokens 32] [--pings 2000]`.
(`--echo tcp|tls` is the raw baseline's echo process, started by the benchmark itself.)
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import socket  # noqa: E402
import ssl  # noqa: E402
import statistics  # noqa: E402
import struct  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import grpc  # noqa: E402
import numpy as np  # noqa: E402

from agents.executor import ReferenceExecutor  # noqa: E402
from agents.sampling import Request, Sampling, generate  # noqa: E402
from bench.shard_load import processes, recv_exact  # noqa: E402
from orchestrator.agent_client import dial  # noqa: E402
from orchestrator.compiler import compile_plan  # noqa: E402
from orchestrator.serving import BringUpOptions, bring_up_replica, remove_replica  # noqa: E402
from orchestrator.weights import SeededWeights  # noqa: E402
from placement.models import MODEL_PRESETS  # noqa: E402
from placement.planner import PlanRequest, make_plan  # noqa: E402
from placement.topology import preset_topology  # noqa: E402
from protos import agent_pb2, agent_pb2_grpc  # noqa: E402
from security import certs as certs_mod  # noqa: E402
from security.identity import CONTROL_PLANE, agent_identity, dns_name  # noqa: E402
from security.tls import ssl_context  # noqa: E402

TINY = MODEL_PRESETS["tiny-llama"]
SEED, MAX_BATCH, MAX_CONTEXT = 3, 4, 128
STAGE_COUNTS = (1, 2, 4, 8)
# What `ratio_vs_reference` divides by: the in-process ReferenceExecutor, not a 1-stage pipeline.
REFERENCE_KIND = "in-process single executor"
PROMPT_LEN = 8
FRAME_BYTES = 16 << 10
TRANSPORTS = {"grpc": agent_pb2.LINK_TRANSPORT_GRPC, "framed": agent_pb2.LINK_TRANSPORT_FRAMED}
ECHO_NODE = "raw-echo"
_LEN = struct.Struct("<Q")


def agent_args(node: str, certs: Path | None) -> tuple[str, ...]:
    """An 8-chip agent: TLS with the certificates in `certs`, plaintext when None."""
    return (
        "-m",
        "agents.main",
        "--node",
        node,
        "--chips",
        "8",
        "--profile",
        "dev",
        "--sram-bytes",
        "96MiB",
        "--listen",
        "127.0.0.1:0",
        *(("--insecure",) if certs is None else ("--certs", str(certs))),
    )


def prompts(n: int) -> list[tuple[int, ...]]:
    return [
        tuple((31 * i + 7 * j + 1) % TINY.vocab_size for j in range(PROMPT_LEN)) for i in range(n)
    ]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


# --- hop latency -----------------------------------------------------------------------------


def hop_latencies(
    stubs: list[Any], addresses: list[str], pings: int, reps: int
) -> dict[str, dict[str, float]]:
    """Per transport, medians over `reps` of LinkPing's p50/p99. The transports take turns
    (their order alternating rep by rep) so that both see the same load on a shared machine."""
    runs: dict[str, list[tuple[list[float], list[float]]]] = {t: [] for t in TRANSPORTS}
    for rep in range(reps):
        for label in turns(rep):
            reply = stubs[0].LinkPing(
                agent_pb2.LinkPingRequest(
                    peer=addresses[1],
                    count=pings,
                    payload_bytes=FRAME_BYTES,
                    transport=TRANSPORTS[label],
                ),
                timeout=300,
            )
            runs[label].append((list(reply.one_way_ms), list(reply.round_trip_ms)))
    return {
        label: {
            "hop_p50_ms": statistics.median(percentile(o, 50) for o, _ in got),
            "hop_p99_ms": statistics.median(percentile(o, 99) for o, _ in got),
            "round_trip_p50_ms": statistics.median(percentile(r, 50) for _, r in got),
            "round_trip_p99_ms": statistics.median(percentile(r, 99) for _, r in got),
        }
        for label, got in runs.items()
    }


def turns(rep: int) -> list[str]:
    """The transports in the order rep `rep` measures them (alternating)."""
    order = list(TRANSPORTS)
    return order if rep % 2 == 0 else order[::-1]


# --- the raw TCP / TLS baseline --------------------------------------------------------------


def run_echo(kind: str, certs: str | None) -> None:
    """The echo process: one connection at a time, each length-prefixed frame answered with
    an 8-byte ack (its length), on one blocking socket — the simplest raw round trip."""
    ctx = None
    if kind == "tls":
        assert certs is not None
        certs_mod.issue(certs, agent_identity(ECHO_NODE))
        ctx = ssl_context(certs_mod.load_agent(certs, ECHO_NODE), server_side=True)
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        raw, _ = listener.accept()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = ctx.wrap_socket(raw, server_side=True) if ctx is not None else raw
        with conn:
            try:
                while True:
                    (n,) = _LEN.unpack(recv_exact(conn, _LEN.size))
                    recv_exact(conn, n)
                    conn.sendall(_LEN.pack(n))
            except (ConnectionError, OSError):
                continue


def raw_round_trip(
    address: str, pings: int, reps: int, certs: Path | None = None
) -> dict[str, float]:
    """p50/p99 (medians over `reps`) of a 16 KiB frame + ack round trip to the echo process."""
    host, port = address.rsplit(":", 1)
    payload = _LEN.pack(FRAME_BYTES) + bytes(FRAME_BYTES)
    runs = []
    for _ in range(reps):
        raw = socket.create_connection((host, int(port)))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket | ssl.SSLSocket = raw
        if certs is not None:
            ctx = ssl_context(certs_mod.load(certs, CONTROL_PLANE), server_side=False)
            sock = ctx.wrap_socket(raw, server_hostname=dns_name(agent_identity(ECHO_NODE)))
        times = []
        with sock:
            for i in range(pings + 1):
                started = time.perf_counter_ns()
                sock.sendall(payload)
                recv_exact(sock, _LEN.size)
                if i:
                    times.append((time.perf_counter_ns() - started) / 1e6)
        runs.append(times)
    return {
        "round_trip_p50_ms": statistics.median(percentile(t, 50) for t in runs),
        "round_trip_p99_ms": statistics.median(percentile(t, 99) for t in runs),
    }


def raw_baselines(args: argparse.Namespace, certs: Path) -> dict[str, dict[str, float]]:
    out = {}
    with processes() as start:
        for kind in ("tcp", "tls"):
            _, address = start("-m", "bench.lockstep", "--echo", kind, "--certs", str(certs))
            out[kind] = raw_round_trip(
                address, args.pings, args.reps, certs if kind == "tls" else None
            )
    return out


# --- serving ---------------------------------------------------------------------------------


@dataclass
class Pair:
    """Two agents (node names n0, n1) and how to dial them."""

    addresses: list[str]
    certs: Path | None

    def channel(self, i: int) -> grpc.Channel:
        """The control plane's channel to agent i (mutual TLS, or plaintext without certs)."""
        creds = None if self.certs is None else certs_mod.load_control_plane(self.certs)
        return dial(self.addresses[i], creds, f"n{i}")

    def nodes(self) -> dict[str, str] | None:
        return None if self.certs is None else {a: f"n{i}" for i, a in enumerate(self.addresses)}


def deploy(
    stages: int,
    channels: dict[str, grpc.Channel],
    pair: Pair,
    store: Path,
    transport: int = 0,
    tag: str = "",
    chip_offset: int = 0,
) -> tuple[str, list[str]]:
    """Compile, load and start a replica of `stages` stages whose links between the agents use
    `transport` (agent_pb2.LinkTransport), on chips from `chip_offset` up: its name, the
    agents used."""
    name = f"s{stages}{tag}"
    request = PlanRequest(
        name,
        TINY,
        "fp16",
        replicas=1,
        max_context=MAX_CONTEXT,
        max_batch=MAX_BATCH,
        tensor_parallel=1,
        pipeline_stages=stages,
        spread="none",
        spares_per_rack=0,
    )
    plan = make_plan(request, preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, store)
    addresses = pair.addresses
    half = max(1, stages // 2)
    where = {
        r.chip: (
            addresses[0 if r.binding.stage < half or stages == 1 else 1],
            chip_offset + r.binding.stage % half,
        )
        for r in refs
    }
    up = bring_up_replica(
        plan,
        refs,
        where,
        channels,
        nodes=pair.nodes(),
        options=BringUpOptions(link_transport=transport),
    )
    return name, up.addresses


def serve(
    stub: Any, deployment: str, rid: str, prompt: tuple[int, ...], n: int
) -> tuple[tuple[int, ...], np.ndarray]:
    replies = list(
        stub.Generate(
            agent_pb2.GenerateRequest(
                deployment=deployment,
                request_id=rid,
                prompt_ids=prompt,
                max_tokens=n,
                return_logits=True,
            ),
            timeout=300,
        )
    )
    return (
        tuple(r.token for r in replies),
        np.stack([np.frombuffer(r.logits, dtype="<f4") for r in replies]),
    )


class BenchFailed(Exception):
    """A request of the benchmark failed or never finished: the run proves nothing."""


def timed_batch(
    stub: Any, deployment: str, tag: str, batch: list[tuple[int, ...]], n: int
) -> tuple[float, dict[int, tuple[tuple[int, ...], np.ndarray]]]:
    """Serve `batch` concurrently; raises `BenchFailed` unless every request returned."""
    results: dict[int, tuple[tuple[int, ...], np.ndarray]] = {}
    errors: dict[int, BaseException] = {}

    def one(i: int) -> None:
        try:
            results[i] = serve(stub, deployment, f"{tag}-{i}", batch[i], n)
        except BaseException as exc:  # reported below, by the calling thread
            errors[i] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(batch))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    seconds = time.perf_counter() - started
    stuck = [i for i, t in enumerate(threads) if t.is_alive()]
    missing = sorted(set(range(len(batch))) - set(results))
    if errors or stuck or missing:
        detail = "; ".join(f"request {tag}-{i}: {errors[i]!r}" for i in sorted(errors))
        raise BenchFailed(
            f"{deployment}: {len(missing)} of {len(batch)} requests returned no result"
            f" (still running: {stuck}){': ' + detail if detail else ''}"
        )
    return seconds, results


class ReferenceRuns:
    """The reference executor's tokens/s, sampled in turn with the pipelines (one sample per
    rep of every stage count, on both pairs) so that its figure sees the same machine load."""

    def __init__(self, ref: ReferenceExecutor, batch: list[tuple[int, ...]], n: int) -> None:
        self.ref, self.batch, self.n = ref, batch, n
        self.solo = [ref.generate(p, n) for p in batch]  # also warms up
        self.samples: dict[str, list[float]] = {"one": [], "batch": []}

    def sample(self) -> None:
        n, batch = self.n, self.batch
        started = time.perf_counter()
        self.ref.generate(batch[0], n)
        self.samples["one"].append(n / (time.perf_counter() - started))
        started = time.perf_counter()
        generate(self.ref.step, [Request(p, n, Sampling(), slot=i) for i, p in enumerate(batch)])
        self.samples["batch"].append(len(batch) * n / (time.perf_counter() - started))

    def rates(self) -> dict[str, float]:
        return {mode: statistics.median(values) for mode, values in self.samples.items()}


def run(args: argparse.Namespace) -> dict[str, Any]:
    batch = prompts(MAX_BATCH)
    n = args.tokens
    ref = ReferenceExecutor(
        TINY, SeededWeights(TINY, SEED, "F16"), max_batch=MAX_BATCH, max_context=MAX_CONTEXT
    )
    reference = ReferenceRuns(ref, batch, n)
    with tempfile.TemporaryDirectory() as tmp:
        certs = Path(tmp) / "certs"
        certs_mod.init_cluster(certs)
        raw = raw_baselines(args, certs)
        tls = run_pair(args, certs, Path(tmp) / "tls", batch, reference)
        plain = run_pair(args, None, Path(tmp) / "plain", batch, reference)
    ref_rates = reference.rates()
    return {
        "hops": tls["grpc"]["hops"],
        "tokens_per_s": {"reference": ref_rates, **tls["grpc"]["tokens_per_s"]},
        "identical": tls["identical"] and plain["identical"],
        "plaintext": plain["grpc"],
        "framed": {**tls["framed"], "plaintext": plain["framed"]},
        "raw": raw,
    }


def run_pair(
    args: argparse.Namespace,
    certs: Path | None,
    store: Path,
    batch: list[tuple[int, ...]],
    reference: ReferenceRuns,
) -> dict[str, Any]:
    """Hops and serving on a fresh pair of agents (TLS with `certs`, plaintext when None), for
    each link transport: {"grpc": {hops, tokens_per_s}, "framed": {...}, "identical": bool}."""
    store.mkdir()
    out: dict[str, Any] = {"identical": True}
    with processes() as start:
        started = [start(*agent_args(f"n{i}", certs)) for i in range(2)]
        pair = Pair([address for _, address in started], certs)
        addresses = pair.addresses
        channels = [pair.channel(i) for i in range(2)]
        by_address = dict(zip(addresses, channels, strict=True))
        stubs = [agent_pb2_grpc.AgentStub(c) for c in channels]
        hops = hop_latencies(stubs, addresses, args.pings, args.reps)
        rates, out["identical"] = serve_stages(
            args, pair, by_address, stubs, store, batch, reference
        )
        for label in TRANSPORTS:
            out[label] = {"hops": hops[label], "tokens_per_s": rates[label]}
        for channel in channels:
            channel.close()
    return out


def serve_stages(
    args: argparse.Namespace,
    pair: Pair,
    by_address: dict[str, grpc.Channel],
    stubs: list[Any],
    store: Path,
    batch: list[tuple[int, ...]],
    reference: ReferenceRuns,
) -> tuple[dict[str, dict[str, dict[str, float]]], bool]:
    """tokens/s of 1, 2, 4, 8 stages per transport, and whether every token and logit was the
    reference's. For each stage count both transports' replicas run side by side (gRPC links
    on chips 0-3, framed on chips 4-7) and take turns rep by rep, in alternating order, so a
    load change on the shared machine falls on both."""
    n = args.tokens
    solo = reference.solo
    tokens_per_s: dict[str, dict[str, dict[str, float]]] = {t: {} for t in TRANSPORTS}
    identical = True
    head = stubs[0]
    for stages in STAGE_COUNTS:
        names = {}
        for i, (label, transport) in enumerate(TRANSPORTS.items()):
            names[label] = deploy(
                stages, by_address, pair, store, transport, f"-{label}", chip_offset=4 * i
            )
            serve(head, names[label][0], "warm", batch[0], 4)
        one: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        many: dict[str, list[float]] = {t: [] for t in TRANSPORTS}
        for rep in range(args.reps):
            reference.sample()
            for label in turns(rep):
                name = names[label][0]
                t0 = time.perf_counter()
                tokens, logits = serve(head, name, f"one-{rep}", batch[0], n)
                one[label].append(n / (time.perf_counter() - t0))
                identical &= (
                    tokens == solo[0].tokens
                    and logits.tobytes() == solo[0].logits.astype("<f4").tobytes()
                )
                seconds, results = timed_batch(head, name, f"b{rep}", batch, n)
                many[label].append(len(batch) * n / seconds)
                for i, (tokens, logits) in results.items():
                    identical &= (
                        tokens == solo[i].tokens
                        and logits.tobytes() == solo[i].logits.astype("<f4").tobytes()
                    )
        for label, (name, used) in names.items():
            tokens_per_s[label][f"{stages}_stages"] = {
                "one": statistics.median(one[label]),
                "batch": statistics.median(many[label]),
            }
            remove_replica(by_address, name, used)
    return tokens_per_s, identical


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    hops, rates = result["hops"], result["tokens_per_s"]
    ref = rates["reference"]
    print(
        f"hop (16 KiB frame, one way): p50 {hops['hop_p50_ms']:.3f} ms, "
        f"p99 {hops['hop_p99_ms']:.3f} ms; round trip p50 {hops['round_trip_p50_ms']:.3f} ms, "
        f"p99 {hops['round_trip_p99_ms']:.3f} ms"
    )
    print(
        f"{'pipeline':<12}{'1 request tok/s':>18}{'ratio':>8}"
        f"{f'{MAX_BATCH} requests tok/s':>20}{'ratio':>8}"
    )
    ratios = {}
    for key, value in rates.items():
        ratio = {"one": value["one"] / ref["one"], "batch": value["batch"] / ref["batch"]}
        if key != "reference":
            ratios[key] = {k: round(v, 3) for k, v in ratio.items()}
        print(
            f"{key:<12}{value['one']:>18.1f}{ratio['one']:>8.2f}"
            f"{value['batch']:>20.1f}{ratio['batch']:>8.2f}"
        )
    print(f"bit-identical to the reference: {result['identical']}")
    print(
        f"note: ratio = pipeline / reference, where the reference is {REFERENCE_KIND} "
        "(no gRPC, no processes); the pipelines run as agent processes over gRPC"
    )
    extra = tls_cost(result)
    framed = framed_report(result)
    return {
        "bench": "lockstep",
        "hop_p50_ms": round(hops["hop_p50_ms"], 4),
        "hop_p99_ms": round(hops["hop_p99_ms"], 4),
        "round_trip_p50_ms": round(hops["round_trip_p50_ms"], 4),
        "round_trip_p99_ms": round(hops["round_trip_p99_ms"], 4),
        "hop_target_p50_ms": 0.25,
        "hop_p50_within_target": hops["hop_p50_ms"] <= 0.25,
        "bit_identical_to_reference": result["identical"],
        "tokens_per_s": {k: {m: round(x, 1) for m, x in v.items()} for k, v in rates.items()},
        "ratio_vs_reference": ratios,
        "reference_kind": REFERENCE_KIND,
        "max_batch": MAX_BATCH,
        "tokens_per_request": args.tokens,
        "reps": args.reps,
        "transport": "mutual TLS",
        "link_transport": "grpc",
        **extra,
        **framed,
    }


def tls_cost(result: dict[str, Any]) -> dict[str, Any]:
    """The plaintext pair's figures and the cost of TLS as ratios (above 1: TLS is slower)."""
    plain = result.get("plaintext")
    if plain is None:
        return {}
    hops, plain_hops = result["hops"], plain["hops"]
    rates, plain_rates = result["tokens_per_s"], plain["tokens_per_s"]
    print(
        f"plaintext (--insecure): hop p50 {plain_hops['hop_p50_ms']:.3f} ms, p99 "
        f"{plain_hops['hop_p99_ms']:.3f} ms; round trip p50 "
        f"{plain_hops['round_trip_p50_ms']:.3f} ms"
    )
    for key, value in plain_rates.items():
        print(f"{key + ' plain':<12}{value['one']:>18.1f}{'':>8}{value['batch']:>20.1f}")
    cost = {
        "hop_p50": hops["hop_p50_ms"] / plain_hops["hop_p50_ms"],
        "hop_p99": hops["hop_p99_ms"] / plain_hops["hop_p99_ms"],
        "round_trip_p50": hops["round_trip_p50_ms"] / plain_hops["round_trip_p50_ms"],
        **{
            f"{key}_{mode}_tokens_per_s": plain_rates[key][mode] / rates[key][mode]
            for key in plain_rates
            for mode in ("one", "batch")
        },
    }
    print(
        f"TLS cost: hop p50 x{cost['hop_p50']:.2f}, round trip p50 x"
        f"{cost['round_trip_p50']:.2f} (TLS / plaintext)"
    )
    return {
        "plaintext": {
            "hop_p50_ms": round(plain_hops["hop_p50_ms"], 4),
            "hop_p99_ms": round(plain_hops["hop_p99_ms"], 4),
            "round_trip_p50_ms": round(plain_hops["round_trip_p50_ms"], 4),
            "round_trip_p99_ms": round(plain_hops["round_trip_p99_ms"], 4),
            "tokens_per_s": {
                k: {m: round(x, 1) for m, x in v.items()} for k, v in plain_rates.items()
            },
        },
        "tls_cost_ratio": {k: round(v, 3) for k, v in cost.items()},
    }


def framed_report(result: dict[str, Any]) -> dict[str, Any]:
    """The framed transport's figures beside the gRPC Link's and the raw baselines (empty
    when the run measured none)."""
    framed, raw = result.get("framed"), result.get("raw")
    if framed is None or raw is None:
        return {}
    ref = result["tokens_per_s"]["reference"]
    plain = framed["plaintext"]
    grpc_tls, grpc_plain = result["hops"], result["plaintext"]["hops"]

    def over(hops: dict[str, float], base: dict[str, float]) -> dict[str, float]:
        return {
            "hop_p50": hops["hop_p50_ms"] / base["round_trip_p50_ms"],
            "round_trip_p50": hops["round_trip_p50_ms"] / base["round_trip_p50_ms"],
        }

    vs_raw = {"tls": over(framed["hops"], raw["tls"]), "plaintext": over(plain["hops"], raw["tcp"])}
    grpc_vs_raw = {"tls": over(grpc_tls, raw["tls"]), "plaintext": over(grpc_plain, raw["tcp"])}
    within = all(v["hop_p50"] <= 2.0 for v in vs_raw.values())
    print("raw baseline (16 KiB frame + 8-byte ack, one blocking socket each side):")
    for kind in ("tcp", "tls"):
        print(
            f"  raw {kind.upper():<4} round trip p50 {raw[kind]['round_trip_p50_ms']:.3f} ms, "
            f"p99 {raw[kind]['round_trip_p99_ms']:.3f} ms"
        )
    for label, hops, base in (
        ("gRPC Link, TLS", grpc_tls, "tls"),
        ("framed, TLS", framed["hops"], "tls"),
        ("gRPC Link, plain", grpc_plain, "tcp"),
        ("framed, plain", plain["hops"], "tcp"),
    ):
        print(
            f"  {label:<18} hop p50 {hops['hop_p50_ms']:.3f} ms p99 {hops['hop_p99_ms']:.3f} ms,"
            f" round trip p50 {hops['round_trip_p50_ms']:.3f} ms; hop / raw {base.upper()} "
            f"round trip x{hops['hop_p50_ms'] / raw[base]['round_trip_p50_ms']:.2f}"
        )
    print(
        f"framed hop within 2x of the raw round trip of the same security (TLS vs raw TLS, "
        f"plaintext vs raw TCP): {within}"
    )
    print(f"{'framed':<12}{'1 request tok/s':>18}{'ratio':>8}{f'{MAX_BATCH} requests tok/s':>20}")
    for key, value in framed["tokens_per_s"].items():
        print(
            f"{key:<12}{value['one']:>18.1f}{value['one'] / ref['one']:>8.2f}"
            f"{value['batch']:>20.1f}{value['batch'] / ref['batch']:>8.2f}"
        )

    def rounded(rates: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        return {k: {m: round(x, 1) for m, x in v.items()} for k, v in rates.items()}

    def hop_figures(hops: dict[str, float]) -> dict[str, float]:
        return {k: round(v, 4) for k, v in hops.items()}

    return {
        "raw_round_trip_ms": {
            kind: {k: round(v, 4) for k, v in figures.items()} for kind, figures in raw.items()
        },
        "framed": {
            **hop_figures(framed["hops"]),
            "tokens_per_s": rounded(framed["tokens_per_s"]),
            "ratio_vs_reference": {
                k: {m: round(x / ref[m], 3) for m, x in v.items()}
                for k, v in framed["tokens_per_s"].items()
            },
            "plaintext": {
                **hop_figures(plain["hops"]),
                "tokens_per_s": rounded(plain["tokens_per_s"]),
            },
            "vs_raw": {k: {m: round(x, 2) for m, x in v.items()} for k, v in vs_raw.items()},
            "compared_with": "the raw round trip of the same security (TLS: raw TLS; "
            "plaintext: raw TCP), measured in this run",
            "within_2x": within,
        },
        "grpc_vs_raw": {k: {m: round(x, 2) for m, x in v.items()} for k, v in grpc_vs_raw.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--pings", type=int, default=2000)
    parser.add_argument("--echo", choices=("tcp", "tls"), help=argparse.SUPPRESS)
    parser.add_argument("--certs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo:
        run_echo(args.echo, args.certs)
        return
    try:
        result = run(args)
    except (BenchFailed, grpc.RpcError) as exc:
        print(f"lockstep bench failed: {exc}", file=sys.stderr, flush=True)
        sys.exit(1)
    print(json.dumps(report(result, args)), flush=True)


if __name__ == "__main__":
    main()
