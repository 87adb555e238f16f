"""The timing-only lockstep replica in process (no gRPC): synthetic outputs, simulated time,
hash chains, the link checks at delivery (`agents.virtual_pipeline`)."""

from __future__ import annotations

import asyncio
import time

from agents.journal import Journal
from agents.lockstep import Schedule
from agents.stage_core import ChipsReady, StageCore, Submit
from agents.virtual_pipeline import SimReplica, SimStage, TokenOut
from placement.profiles import get_profile

STAGES = 6
SECRET = b"s" * 32


def _replica(name: str, scale: float, *, upstream: str = "") -> SimReplica:
    """A replica of STAGES stages on three nodes (two stages each); stage 2's upstream
    identity is `upstream` or the right one."""
    sim = SimReplica(
        name, 0, STAGES, 2, SECRET, get_profile("groq-rack"), scale, 512, lambda s: None
    )
    chips = frozenset(f"c{s}" for s in range(STAGES))
    node = [f"rack-0/node-{s // 2}" for s in range(STAGES)]
    for s in range(STAGES):
        up = node[(s - 1) % STAGES]
        expected = "" if up == node[s] else f"spiffe://lockstep/agent/{up}"
        if s == 2 and upstream:
            expected = upstream
        down = node[(s + 1) % STAGES]
        core = StageCore(
            label=f"{name}/stage-{s}",
            stage=s,
            schedule=Schedule(STAGES, 2),
            window=2,
            chips=chips,
            journal=Journal(2, 64, 4, set()) if s == 0 else None,
            vocab_size=512,
        )
        sim.add(
            SimStage(
                core,
                node[s],
                f"spiffe://lockstep/agent/{node[s]}",
                f"addr-{node[s]}",
                "rack-0",
                f"shard-{s}",  # the same shards in every replica
                (f"c{s}",),
                (s,),
                0.01,
                4096,
                "" if down == node[s] else f"addr-{down}",
                expected,
            )
        )
    for s in range(STAGES):
        sim.apply(s, ChipsReady(tuple(chips), 0))
    return sim


async def _generate(sim: SimReplica, request_id: str, prompt: tuple[int, ...]) -> list[TokenOut]:
    stream = sim.open_stream(request_id)
    sim.apply(0, Submit(request_id, prompt, 4))
    outs = []
    while True:
        out = await asyncio.wait_for(stream.get(), 30)
        outs.append(out)
        if out.error is not None or (out.event is not None and out.event.finished):
            return outs


def test_two_replicas_fed_the_same_requests_have_equal_chains() -> None:
    async def run() -> None:
        a, b = _replica("a", 0.0), _replica("b", 0.0)
        ta = [o.event.token for o in await _generate(a, "r1", (1, 2, 3)) if o.event]
        tb = [o.event.token for o in await _generate(b, "r1", (1, 2, 3)) if o.event]
        assert ta == tb and len(ta) == 4 and all(0 <= t < 512 for t in ta)
        other = [o.event.token for o in await _generate(a, "r2", (7, 8)) if o.event]
        assert other != ta  # a function of the input
        await _generate(b, "r2", (7, 8))
        for _ in range(200):  # let the last frames of both settle
            if all(
                a.by_stage[s].core.last_tick == b.by_stage[s].core.last_tick for s in range(STAGES)
            ):
                break
            await asyncio.sleep(0.01)
        for s in range(STAGES):
            ma, mb = a.by_stage[s].core.machine, b.by_stage[s].core.machine
            assert ma.next_tick > 0 and ma.chain == mb.chain, f"stage {s}"
        a.close()
        b.close()

    asyncio.run(run())


def test_ticks_take_the_cost_models_time_scaled() -> None:
    async def run() -> float:
        sim = _replica("t", 1.0)
        t0 = time.perf_counter()
        await _generate(sim, "r", (1, 2))
        sim.close()
        return time.perf_counter() - t0

    # 4 tokens, each through 6 stages of 10 ms: at least 0.24 s of simulated compute
    assert asyncio.run(run()) >= 0.24


def test_a_link_from_the_wrong_identity_stops_the_replica() -> None:
    async def run() -> list[TokenOut]:
        sim = _replica("x", 0.0, upstream="spiffe://lockstep/agent/rack-9/node-9")
        outs = await _generate(sim, "r", (1, 2))
        sim.close()
        return outs

    outs = asyncio.run(run())
    assert outs[-1].error is not None and "not the configured upstream" in outs[-1].error
