"""The planner's front door: a request plus a topology in, a `Plan` out.

`make_plan` partitions (partition.py), maps (mapper.py) and predicts (cost.py).
Nothing here reads a clock: the caller times the call and stamps `planSeconds` with
`Plan.with_timing`, so the plan itself stays a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from placement.cost import (
    PS,
    Prediction,
    Workload,
    hop_seconds,
    kv_group_bytes,
    op_sram_bytes,
    ring_prediction,
    token_hop_bytes,
)
from placement.errors import InputError, Unplaceable
from placement.mapper import SPREADS, Mapping, map_replicas
from placement.models import PRECISION_BYTES, ModelConfig, Op, build_ops
from placement.partition import (
    CHIPS_TARGET_PERCENT,
    Partition,
    chips_target,
    lower_bound_chips,
    ranked_partitions,
)
from placement.plan import OpCut, Plan, StagePlan
from placement.profiles import ChipProfile
from placement.topology import ChipRef, Topology


@dataclass(frozen=True)
class PlanRequest:
    """What a deployment asks of the planner (the planning-relevant part of the spec)."""

    name: str
    model: ModelConfig
    precision: str = "fp16"
    replicas: int = 1
    max_context: int = 2048
    max_batch: int = 1
    tensor_parallel: int | None = None  # None: choose automatically
    pipeline_stages: int | None = None  # None: the fewest that fit; else exactly this many
    spread: str = "rack"
    spares_per_rack: int = 1
    racks: tuple[str, ...] | None = None

    def validate(self) -> None:
        checks = (
            (
                self.precision in PRECISION_BYTES,
                "spec.precision",
                f"must be one of {', '.join(PRECISION_BYTES)}",
            ),
            (self.replicas >= 1, "spec.replicas", "must be at least 1"),
            (self.max_context >= 1, "spec.serving.maxContext", "must be at least 1"),
            (self.max_batch >= 1, "spec.serving.maxBatch", "must be at least 1"),
            (
                self.tensor_parallel in (None, 1, 2, 4, 8),
                "spec.parallelism.tensorParallel",
                "must be auto, 1, 2, 4 or 8",
            ),
            (
                self.spread in SPREADS,
                "spec.placement.spread",
                f"must be one of {', '.join(SPREADS)}",
            ),
            (self.spares_per_rack >= 0, "spec.placement.sparesPerRack", "must be at least 0"),
            (
                self.pipeline_stages is None or self.pipeline_stages >= 1,
                "spec.parallelism.pipelineStages",
                "must be at least 1",
            ),
        )
        for ok, field, message in checks:
            if not ok:
                raise InputError(message, field=field)


def make_plan(request: PlanRequest, topology: Topology) -> Plan:
    """Plan `request` onto `topology`; raises `Unplaceable` with the numbers when it can't."""
    request.validate()
    profile = topology.profile
    work = Workload(request.max_context, request.max_batch, request.precision)
    ops = build_ops(request.model, request.precision)
    partition, mapping = _partition_and_map(request, topology, ops, work)
    tp = partition.table.tp
    count = partition.stage_count
    stage_seconds = [partition.stage_time_ps(i) / PS for i in range(count)]
    # Every replica runs the same stages; only their chips differ.
    cuts = [_stage_cuts(partition, ops, i) for i in range(count)]
    activation_out = [_activation_out(ops, last) for _, last in cuts]
    workspace = profile.usable_sram_bytes - partition.table.capacity
    sram = [partition.stage_bytes(i) + workspace for i in range(count)]
    stages: list[StagePlan] = []
    hops: list[list[float]] = []
    for replica, groups in enumerate(mapping.groups):
        for index, group in enumerate(groups):
            stages.append(
                StagePlan(
                    replica=replica,
                    index=index,
                    first=cuts[index][0],
                    last=cuts[index][1],
                    chips=tuple(topology.chip_id(ref) for ref in group),
                    refs=group,
                    sram_bytes_per_chip=sram[index],
                    sram_capacity_bytes=profile.sram_bytes,
                    stage_seconds=stage_seconds[index],
                    activation_bytes_out=activation_out[index],
                )
            )
        hops.append(replica_hops(topology, [g[0] for g in groups], activation_out))
    prediction = ring_prediction([stage_seconds] * request.replicas, hops, request.max_batch)
    # Replicas share no chip, so each needs its own whole number of chips.
    per_replica = sum(op_sram_bytes(op, 1, request.model, work) for op in ops)
    needed = request.replicas * per_replica
    bound = request.replicas * lower_bound_chips(per_replica, profile.usable_sram_bytes)
    finest = partition.finest_chips
    target = chips_target(bound, None if finest is None else request.replicas * finest)
    chips_used = partition.stage_count * tp * request.replicas
    return Plan(
        deployment=request.name,
        model=request.model.name,
        precision=request.precision,
        profile=profile.name,
        max_context=request.max_context,
        max_batch=request.max_batch,
        replicas=request.replicas,
        tensor_parallel=tp,
        pipeline_stages=partition.stage_count,
        stages=tuple(stages),
        spares=tuple(topology.chip_id(ref) for ref in mapping.spares),
        chips_used=chips_used,
        chips_lower_bound=bound,
        chips_target=target,
        sram_bytes_needed=needed,
        predicted=prediction,
        notes=tuple(_explain(partition, ops, chips_used, bound, request, profile, work)),
    )


def _partition_and_map(
    request: PlanRequest, topology: Topology, ops: Sequence[Op], work: Workload
) -> tuple[Partition, Mapping]:
    """The best partition whose TP groups the topology can hold.

    With `tensorParallel: auto` a wider TP may save chips on paper yet find too few nodes
    with that many healthy free chips; the next width in the ranking is tried then. The
    first (best) candidate's reason is reported when none fits.
    """
    first_error: Unplaceable | None = None
    for partition in ranked_partitions(
        ops,
        request.model,
        topology.profile,
        work,
        request.tensor_parallel,
        request.pipeline_stages,
    ):
        try:
            mapping = map_replicas(
                topology,
                stages=partition.stage_count,
                tp=partition.table.tp,
                replicas=request.replicas,
                spread=request.spread,
                spares_per_rack=request.spares_per_rack,
                racks=request.racks,
            )
        except Unplaceable as exc:
            first_error = first_error or exc
            continue
        return partition, mapping
    assert first_error is not None
    raise first_error


def _activation_out(ops: Sequence[Op], last: OpCut) -> int:
    """Bytes per token a stage ending at `last` hands on: the hidden state, plus the partial
    sum when it stops inside an op or between the experts of one layer."""
    op = ops[last.op]
    inside_op = last.chunk < last.chunks - 1
    following = ops[last.op + 1] if last.op + 1 < len(ops) else None
    inside_moe = (
        following is not None and following.kind == "expert" and (following.layer == op.layer)
    )
    return op.activation_bytes_per_token * (2 if inside_op or inside_moe else 1)


def _stage_cuts(partition: Partition, ops: Sequence[Op], index: int) -> tuple[OpCut, OpCut]:
    table = partition.table
    start, end = partition.bounds[index], partition.bounds[index + 1] - 1

    def cut(pos: int) -> OpCut:
        op = int(table.op_index[pos])
        return OpCut(op, ops[op].name, int(table.chunk_index[pos]), int(table.chunk_count[pos]))

    return cut(start), cut(end)


def replica_hops(
    topology: Topology, stage_chips: Sequence[ChipRef], activation_bytes: Sequence[int]
) -> list[float]:
    """Seconds of every hop of a replica's ring: stage i to i+1, and the last back to 0.

    A one-stage replica has no hop: its sampled token stays on the chip.
    """
    count = len(stage_chips)
    if count == 1:
        return []
    hops = []
    for i in range(count):
        nxt = (i + 1) % count
        nbytes = activation_bytes[i] if nxt else token_hop_bytes()
        hop = topology.hop_class(stage_chips[i], stage_chips[nxt])
        hops.append(hop_seconds(topology.profile, hop, nbytes))
    return hops


def _cut_unit(kind: str, mlp_cut_columns: int) -> str:
    units = {"attention": "query-head", "embedding": "128-row", "lm_head": "128-row"}
    if kind in ("mlp", "expert"):
        return f"{mlp_cut_columns}-column"
    return units.get(kind, "op")


def _explain(
    partition: Partition,
    ops: Sequence[Op],
    used: int,
    bound: int,
    request: PlanRequest,
    profile: ChipProfile,
    work: Workload,
) -> list[str]:
    """Why the plan uses more chips than the SRAM lower bound, in numbers."""
    table = partition.table
    usable = profile.usable_sram_bytes
    notes = [f"{used} chips against a lower bound of {bound} (x{used / bound:.3f})"]
    if used == bound:
        return notes
    tp = table.tp
    ideal_stages = -(-int(table.prefix_bytes[-1]) // table.capacity)
    extra = partition.stage_count - ideal_stages
    workspace = usable - table.capacity
    if workspace:
        notes.append(
            f"every chip keeps {workspace:,} bytes of activation buffers "
            f"({workspace / usable:.1%} of usable SRAM)"
        )
    if request.pipeline_stages is not None:
        fewest = -(-int(table.prefix_bytes[-1]) // table.capacity)
        notes.append(
            f"pipelineStages {request.pipeline_stages} was asked for (the bytes alone need "
            f"{fewest})"
        )
    elif extra:
        biggest = table.largest
        size = table.segment_bytes(biggest, biggest + 1)
        op = ops[int(table.op_index[biggest])]
        notes.append(
            f"contiguous stages cut only between op chunks: {extra} stage(s) per replica more "
            f"than the bytes alone need ({ideal_stages}); the largest piece that cannot be cut "
            f"further is a {op.kind} chunk of {size / 2**20:,.1f} MiB "
            f"({size / table.capacity:.0%} of a chip: {op.kind} ops are cut only at "
            f"{_cut_unit(op.kind, profile.mlp_cut_columns)} boundaries)"
        )
    if partition.finest_chips is not None:
        notes.append(_finest_note(partition.finest_chips, ops, request, profile, work))
    if tp > 1:
        notes.append(
            f"tensorParallel {tp}: every stage takes {tp} chips, and stage counts round up "
            f"per TP group ({request.replicas} replicas x {partition.stage_count} stages x {tp})"
        )
    return notes


def _finest_note(
    finest_chips: int,
    ops: Sequence[Op],
    request: PlanRequest,
    profile: ChipProfile,
    work: Workload,
) -> str:
    """The second look of `ranked_partitions` at a plan over the target, and the piece that
    makes a stage boundary costly: a KV group, held whole on both sides of a boundary inside
    it (the lower bound counts it once)."""
    note = (
        f"over x{CHIPS_TARGET_PERCENT / 100} of the bound at the default pieces, every op was cut "
        f"into the finest pieces the layout supports (a query head, "
        f"{profile.mlp_cut_columns} MLP columns, 128 vocabulary rows): no contiguous split "
        f"of them fits one replica in fewer than {finest_chips} chips"
    )
    groups = [kv_group_bytes(op, request.model, work) for op in ops if op.kind == "attention"]
    if groups:
        share = max(groups) // request.model.num_key_value_heads
        note += (
            f"; a stage boundary inside a KV group holds the group's K/V projections and cache "
            f"on both sides, {share / 2**20:,.1f} MiB ({share / profile.usable_sram_bytes:.1%} "
            f"of a chip)"
        )
    return note


def prediction_for(plan: Plan, topology: Topology) -> Prediction:
    """Recompute the predicted speed of a plan on a topology (after chips moved)."""
    stage_seconds: list[list[float]] = []
    hops: list[list[float]] = []
    for replica in range(plan.replicas):
        stages = plan.replica_stages(replica)
        stage_seconds.append([s.stage_seconds for s in stages])
        firsts = [stage_refs(s, topology)[0] for s in stages]
        hops.append(replica_hops(topology, firsts, [s.activation_bytes_out for s in stages]))
    return ring_prediction(stage_seconds, hops, plan.max_batch)


def stage_refs(stage: StagePlan, topology: Topology) -> tuple[ChipRef, ...]:
    """The stage's chips as refs: the ones kept in the plan, else parsed from the ids."""
    if stage.refs:
        return stage.refs
    return tuple(topology.parse_chip(c) for c in stage.chips)
