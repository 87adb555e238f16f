"""Cost model: SRAM bytes and per-token time of every op, and the pipeline's predicted speed.

Per op, at tensor-parallel width t, for one decoded token of one sequence whose cache is full
(`max_context` positions — the worst case, so predictions are conservative; a sliding-window
layer caches and attends over at most its window):

* memory time  = (weights/t + KV of that sequence/t) / (SRAM bandwidth x memory efficiency)
* compute time = (FLOPs + attention FLOPs over the context)/t / (peak ops x compute efficiency)
* op time      = max of the two (roofline), plus an all-reduce of the hidden state over the
  node links when t > 1 for ops whose output is split (attention, MLP, experts, LM head).

An expert is visited by top_k/num_experts of the tokens, so its weight traffic is scaled by that
expectation. Times are integers in picoseconds so the partitioner's search is exact.

A replica is a ring: latency per token = sum of stage times + every hop (stage to stage, and the
sampled token back to stage 0). With B sequences in flight the busiest stage sets the pace:
cycle = max(latency, B x bottleneck); tokens/s per user = 1/cycle; aggregate = replicas x B/cycle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from placement.models import ACTIVATION_BYTES, ModelConfig, Op
from placement.profiles import ChipProfile, LinkClass
from placement.topology import HopClass

PS = 1e12  # picoseconds per second

_REDUCED_KINDS = ("attention", "mlp", "expert", "lm_head")
_TOKEN_BYTES = 4  # the sampled token id sent back to stage 0


@dataclass(frozen=True)
class Workload:
    """What the deployment asks of every replica."""

    max_context: int
    max_batch: int
    precision: str


def op_sram_bytes(op: Op, tp: int, cfg: ModelConfig, work: Workload) -> int:
    """Bytes one chip of a TP group holds for this op: weights, KV cache and scratch slices.

    Scratch is the fp32 activation rows the op writes for each sequence of the batch (MLP
    intermediates, logits, one head's attention scores). It is counted per op, not shared
    between ops on a chip: conservative, and additive, which keeps the partitioner exact.
    """
    kv = op.kv_bytes_per_token * op.cached_positions(work.max_context) * work.max_batch
    scratch = _scratch_bytes_per_row(op, cfg, work) * work.max_batch
    return math.ceil((op.param_bytes + kv + scratch) / tp)


def kv_group_bytes(op: Op, cfg: ModelConfig, work: Workload) -> int:
    """Of `op_sram_bytes(op, 1, ...)`, the bytes that belong to the KV heads rather than the
    query heads: k/v projections, KV cache and k/v scratch, for all KV heads (0 unless
    attention). A chip holding any query head of a KV group holds its share of these whole."""
    if op.kind != "attention":
        return 0
    kv = op.kv_bytes_per_token * op.cached_positions(work.max_context) * work.max_batch
    scratch = 4 * 2 * cfg.num_key_value_heads * cfg.head_dim * work.max_batch
    return op.kv_param_bytes + kv + scratch


def _scratch_bytes_per_row(op: Op, cfg: ModelConfig, work: Workload) -> int:
    if op.kind == "attention":
        q_dim = cfg.num_attention_heads * cfg.head_dim
        kv_dim = cfg.num_key_value_heads * cfg.head_dim
        return 4 * (q_dim + 2 * kv_dim + op.cached_positions(work.max_context))
    if op.kind in ("mlp", "expert"):
        return 4 * 2 * cfg.intermediate_size
    if op.kind == "router":
        return 4 * cfg.num_local_experts
    if op.kind == "lm_head":
        return 4 * cfg.vocab_size
    return 0


def chip_workspace_bytes(cfg: ModelConfig, work: Workload) -> int:
    """Fixed per-chip buffers: double-buffered fp32 input, output and partial-sum rows."""
    return 2 * 2 * 4 * cfg.hidden_size * work.max_batch


def op_time_ps(op: Op, tp: int, cfg: ModelConfig, profile: ChipProfile, work: Workload) -> int:
    """Time for one token through the whole op on a TP group, in picoseconds."""
    weights: float = op.param_bytes
    if op.kind == "expert" and cfg.num_local_experts:
        weights = weights * cfg.num_experts_per_tok / cfg.num_local_experts
    elif op.kind == "embedding":
        weights = cfg.hidden_size * (op.param_bytes / max(1, cfg.vocab_size * cfg.hidden_size))
    cached = op.cached_positions(work.max_context)
    kv_read = op.kv_bytes_per_token * cached
    memory_s = (weights + kv_read) / tp / (profile.sram_bandwidth * profile.memory_efficiency)
    flops = op.flops_per_token + op.context_flops_per_position * cached
    peak = profile.peak_ops[work.precision]
    compute_s = flops / tp / (peak * profile.compute_efficiency)
    seconds = max(memory_s, compute_s)
    if tp > 1 and op.kind in _REDUCED_KINDS:
        seconds += allreduce_seconds(cfg.hidden_size * ACTIVATION_BYTES, tp, profile.node_link)
    return max(1, round(seconds * PS))


def allreduce_seconds(nbytes: int, tp: int, link: LinkClass) -> float:
    """Ring all-reduce of `nbytes` among `tp` chips over fully connected node links."""
    steps = 2 * (tp - 1)
    return steps * link.latency + steps / tp * nbytes / link.bandwidth


def link_for(profile: ChipProfile, hop: HopClass) -> LinkClass | None:
    if hop is HopClass.NODE:
        return profile.node_link
    if hop is HopClass.RACK:
        return profile.rack_link
    if hop is HopClass.GLOBAL:
        return profile.global_link
    return None


def hop_seconds(profile: ChipProfile, hop: HopClass, nbytes: int) -> float:
    link = link_for(profile, hop)
    if link is None:
        return 0.0
    return link.latency + nbytes / link.bandwidth + profile.hop_overhead


@dataclass(frozen=True)
class Prediction:
    latency_ms_per_token: float
    tokens_per_second_per_user: float
    tokens_per_second: float
    bottleneck_stage_ms: float

    def to_dict(self) -> dict[str, float]:
        return {
            "latencyMsPerToken": round(self.latency_ms_per_token, 6),
            "tokensPerSecondPerUser": round(self.tokens_per_second_per_user, 3),
            "tokensPerSecond": round(self.tokens_per_second, 3),
            "bottleneckStageMs": round(self.bottleneck_stage_ms, 6),
        }


def ring_prediction(
    stage_seconds: list[list[float]], hop_seconds_per_replica: list[list[float]], max_batch: int
) -> Prediction:
    """Predicted speed of replicas given each one's stage times and ring hop times."""
    worst_latency = 0.0
    worst_bottleneck = 0.0
    aggregate = 0.0
    slowest_user = math.inf
    for stages, hops in zip(stage_seconds, hop_seconds_per_replica, strict=True):
        latency = sum(stages) + sum(hops)
        bottleneck = max(stages)
        cycle = max(latency, max_batch * bottleneck)
        worst_latency = max(worst_latency, latency)
        worst_bottleneck = max(worst_bottleneck, bottleneck)
        slowest_user = min(slowest_user, 1.0 / cycle)
        aggregate += max_batch / cycle
    return Prediction(
        latency_ms_per_token=worst_latency * 1e3,
        tokens_per_second_per_user=slowest_user,
        tokens_per_second=aggregate,
        bottleneck_stage_ms=worst_bottleneck * 1e3,
    )


def token_hop_bytes() -> int:
    return _TOKEN_BYTES
