"""Silent-data-corruption canary: which chip, stage and tick first computed a wrong output.

Pure code over data. The verifier (`orchestrator.verify`) runs one canary request through
every replica and asks each stage for the sha256 of its outputs at the ticks the request
occupied; this module decides what those traces say.

What is compared. A stage's hash chain over *all* its ticks differs between replicas that
served different requests, so it proves nothing about corruption. The canary compares
per-request chains instead: stage s of a replica whose stage 0 fed the request's prefill at
tick t0 worked on that request at ticks t0 + s + k * P (k = 0, 1, ...; P the ring period), and
its outputs there are a function of the request and the stage's shard alone — kernels are
row-independent and deterministic, and each slot has its own KV cache (`agents/journal.py`).
So for two replicas the k-th output digest of stage s must be equal, whatever else they
served and whenever the request arrived. `request_chain` chains a trace's digests
(h_k = sha256(h_{k-1} || k || digest_k)), and the first link at which two chains differ is
the first differing output.

The reference. Which of two differing traces is wrong needs a third opinion. Per stage (traces
are grouped by the stage's shard ids, so only stages running the same shard are compared):

1. a strict majority of identical traces among this run's replicas (3+ replicas, or 2 that
   agree) is the reference;
2. otherwise the trace recorded at an earlier verification of the same shard and canary
   (the verifier keeps the last agreed one; a single replica's first run is recorded as
   found: trust on first use);
3. otherwise the stage is `unresolved` and the verifier runs the canary once more: a transient
   corruption does not repeat, so the second run's traces outvote it.

Attribution. A corrupted output corrupts everything downstream of it, at later ticks. So a
replica's divergence is its earliest wrong output in tick order — the stage whose input was
still right — which names the stage, its chips (a tensor-parallel group shares its stage's
output, so all its ranks are named) and the tick. A trace that lacks a digest where the
reference has one (the stage stopped, or its log no longer holds the tick) is a `missing`
divergence: reported, never fenced.

Rings longer than the digest log. Stage s's k-th output for the canary is at tick
t0 + s + k * P, and the control plane learns t0 only from the tokens, the last of which
comes back a whole period after the last output — so when it asks, stage s's outputs are
between P and n * P ticks old (n tokens), whatever the stage. An agent keeps its last
`chain_log_limit` ticks, and at least one ring period plus a slack
(`agents.settings.AgentSettings.stage_log_limit`): a 1,868-stage replica (P = 1,868) with a
4-token canary has its last output held and its first three gone. Comparing only the held
outputs would not be sound: a corruption in an earlier output changes the token and the KV
caches every later output of every stage depends on, so the first difference among the held
ones would name the wrong stage (stage 0, whose input token changed). So the canary's whole
history must be held: a stage trace whose first outputs are gone but later ones are not (a
digest log rolled past them; a stopped stage lacks the later ones instead) marks its
divergence `unheld` (a missing one: never fenced), `held_steps` gives how many of the last
outputs every stage still held, and the verifier runs the canary again with that many tokens
— a canary short enough to fit every replica's log (and remembers it for the deployment's
ring). One token is the prefill: every op of every stage still runs on the prompt.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

Digests = tuple[bytes | None, ...]
GENESIS = b"\x00" * 32


@dataclass(frozen=True)
class StageTrace:
    """One stage's output digests for the canary in one replica (step k: its k-th output for
    the request; None where the stage had none). `key` identifies what it ran (its shard
    ids): only traces with the same key are compared."""

    stage: int
    chips: tuple[str, ...]
    key: tuple[str, ...]
    digests: Digests


@dataclass(frozen=True)
class ReplicaTrace:
    """The canary in one replica: its stage-0 prefill tick, the ring period and every stage."""

    replica: int
    first_tick: int
    period: int
    stages: tuple[StageTrace, ...]

    def tick(self, stage: int, step: int) -> int:
        """The absolute tick at which `stage` produced its `step`-th output for the canary."""
        return self.first_tick + stage + step * self.period


@dataclass(frozen=True)
class Divergence:
    """A replica's first output that differs from the reference."""

    replica: int
    stage: int
    chips: tuple[str, ...]
    step: int
    tick: int
    missing: bool  # no digest there at all (not evidence of corruption)
    unheld: bool = False  # missing because the stage's digest log rolled past the output

    def describe(self) -> str:
        what = "produced no output" if self.missing else "computed a different output"
        if self.unheld:
            what = "no longer held its output (its digest log rolled past it)"
        return (
            f"replica {self.replica} stage {self.stage} (chip {', '.join(self.chips)}) {what} "
            f"at tick {self.tick} (the canary's step {self.step})"
        )


@dataclass(frozen=True)
class Verdict:
    """What the traces say. `references` per stage key: where each reference came from
    ("majority", "first run", "recorded"); `agreed` the references worth recording (those
    this run established); `unresolved` the stage keys with no reference."""

    divergences: tuple[Divergence, ...]
    references: Mapping[tuple[str, ...], str]
    agreed: Mapping[tuple[str, ...], Digests]
    unresolved: tuple[tuple[str, ...], ...]

    @property
    def corrupted(self) -> tuple[Divergence, ...]:
        """Divergences that are evidence of a silent corruption (a different output)."""
        return tuple(d for d in self.divergences if not d.missing)

    @property
    def passed(self) -> bool:
        return not self.divergences and not self.unresolved


def request_chain(digests: Sequence[bytes | None]) -> tuple[bytes, ...]:
    """The per-request hash chain over a stage's canary outputs, one head per step (a missing
    digest chains as 32 zero bytes: it still differs from any real output)."""
    heads: list[bytes] = []
    head = GENESIS
    for step, digest in enumerate(digests):
        link = step.to_bytes(8, "little") + (digest if digest is not None else GENESIS)
        head = hashlib.sha256(head + link).digest()
        heads.append(head)
    return tuple(heads)


def first_held(digests: Sequence[bytes | None]) -> int:
    """The first step with a digest (len(digests) when there is none): the steps before it
    fell out of the stage's digest log, if any step after it is held."""
    return next((step for step, digest in enumerate(digests) if digest is not None), len(digests))


def held_steps(traces: Sequence[ReplicaTrace]) -> int | None:
    """How many of the canary's last outputs every stage of every trace still held, when some
    stage's log no longer reached back to the first ones (see the module docstring); None when
    no output fell out. 0: some stage held none (its log is shorter than one ring period, or
    it stopped)."""
    fewest: int | None = None
    for trace in traces:
        for stage in trace.stages:
            lost = first_held(stage.digests)
            if lost:
                held = len(stage.digests) - lost
                fewest = held if fewest is None else min(fewest, held)
    return fewest


def first_difference(a: Sequence[bytes | None], b: Sequence[bytes | None]) -> int | None:
    """The first step at which two traces' chains differ (a step one lacks counts), or None."""
    chain_a, chain_b = request_chain(a), request_chain(b)
    for step in range(max(len(chain_a), len(chain_b))):
        if step >= len(chain_a) or step >= len(chain_b) or chain_a[step] != chain_b[step]:
            return step
    return None


def references(
    traces: Sequence[ReplicaTrace], recorded: Mapping[tuple[str, ...], Digests]
) -> tuple[dict[tuple[str, ...], Digests], dict[tuple[str, ...], str]]:
    """The reference trace per stage key and where it came from (see the module docstring)."""
    by_key: dict[tuple[str, ...], list[Digests]] = {}
    for trace in traces:
        for stage in trace.stages:
            by_key.setdefault(stage.key, []).append(stage.digests)
    chosen: dict[tuple[str, ...], Digests] = {}
    source: dict[tuple[str, ...], str] = {}
    for key, seen in by_key.items():
        best, votes = Counter(seen).most_common(1)[0]
        complete = None not in best
        if complete and votes * 2 > len(seen) and (len(seen) > 1 or key not in recorded):
            chosen[key], source[key] = best, "majority" if len(seen) > 1 else "first run"
        elif key in recorded:
            chosen[key], source[key] = recorded[key], "recorded"
    return chosen, source


def judge(
    traces: Sequence[ReplicaTrace], recorded: Mapping[tuple[str, ...], Digests] | None = None
) -> Verdict:
    """Compare every replica's canary traces with the references; one divergence per
    replica trace (its earliest wrong output in tick order). A replica may appear in several
    traces (a second run): each is judged."""
    chosen, source = references(traces, recorded or {})
    divergences: list[Divergence] = []
    for trace in traces:
        first: Divergence | None = None
        for stage in trace.stages:
            ref = chosen.get(stage.key)
            if ref is None:
                continue
            step = first_difference(stage.digests, ref)
            if step is None:
                continue
            missing = step >= len(stage.digests) or stage.digests[step] is None
            unheld = missing and step < first_held(stage.digests) < len(stage.digests)
            found = Divergence(
                trace.replica,
                stage.stage,
                stage.chips,
                step,
                trace.tick(stage.stage, step),
                missing,
                unheld,
            )
            if first is None or (found.missing, found.tick) < (first.missing, first.tick):
                first = found  # a wrong output outranks a missing one; then the earliest
        if first is not None:
            divergences.append(first)
    agreed = {k: v for k, v in chosen.items() if source[k] != "recorded"}
    keys = {s.key for t in traces for s in t.stages}
    unresolved = tuple(sorted(k for k in keys if k not in chosen))
    return Verdict(tuple(divergences), source, agreed, unresolved)


def first_tick_of(token_ticks: Sequence[int], period: int) -> int | None:
    """Stage 0's prefill tick of a request from the ticks its tokens came back at (token k
    returns k + 1 periods after the prefill), or None when they are not spaced so — the
    request was replayed (a failover moved it) and its ticks say nothing about a clean run."""
    if not token_ticks or period < 1:
        return None
    first = token_ticks[0] - period
    if first < 0:
        return None
    for k, tick in enumerate(token_ticks):
        if tick != first + (k + 1) * period:
            return None
    return first
