"""Shard compiler: a plan and its weights in, one content-addressed shard per chip out.

Every chip of the plan (each TP rank of each stage of each replica) gets a `ShardRef`. The shard
itself is ONE safetensors blob: the chip's weight slices (its chunk range of every op it runs,
cut again for its TP rank; norms replicated) plus, in the `__metadata__` key
`lockstep.manifest`, the program manifest (`shardformat.manifest.Manifest`, whose docstring
gives the wire shape). The blob's shard id is its BLAKE3 digest (`shardformat.address`).

What a blob deliberately does NOT hold is where it runs: deployment, replica, chip ids, TP
group and upstream/downstream peers are the `ChipBinding` of its `ShardRef`. The blob is then a
pure function of (model, weights, stage layout), so the replicas of a plan share one blob per
stage and rank (content-address dedupe), and a failover that moves a stage to a spare chip
reuses the stored blob instead of recompiling it and its neighbours. `chip_manifest` gives the
agent both halves as one dict (the blob's manifest plus `binding`).

Compilation streams: one tensor slice is read (or generated) and written at a time. A recipe
index (recipe = manifest + weight-source fingerprint) maps to the blob already built, so
compiling the same plan again reads no weights and writes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.shard_store import ShardStore, StoredBlob, canonical_json
from orchestrator.weights import (
    PRECISION_DTYPES,
    SeededWeights,
    WeightSource,
    open_checkpoint,
    read_text_spec,
)
from placement.errors import InputError
from placement.models import PRECISION_BYTES, ModelConfig, Op, build_ops, kv_heads_of
from placement.plan import Plan, StagePlan
from shardformat.codec import TensorEntry, decode_f32, encode_header
from shardformat.layout import (
    PieceSpec,
    TensorSlice,
    checkpoint_tensor_shapes,
    piece_tensors,
    stage_pieces,
)
from shardformat.manifest import MANIFEST_KEY, Manifest, tensor_infos
from shardformat.precision import (
    QUANTIZED_DTYPES,
    encode,
    row_scales,
    scale_name,
    storage_dtype,
)
from shardformat.text import TextSpec

VIRTUAL_AUTO_BYTES = 1 << 30
"""Seeded models larger than this compile to virtual shards unless told otherwise."""

WeightInput = int | str | os.PathLike[str] | WeightSource
"""A seed (int), a checkpoint directory, or any `WeightSource`."""


@dataclass(frozen=True)
class ChipBinding:
    """Where a shard runs: the placement half of a chip's manifest."""

    deployment: str
    chip: str
    replica: int
    stage: int
    stages: int
    tick_offset: int
    tp_rank: int
    tp_size: int
    tp_group: tuple[str, ...]
    upstream: tuple[str, ...]  # the previous stage's chips (stage 0: the last stage's)
    downstream: tuple[str, ...]  # the next stage's chips (the last stage: stage 0's)

    def to_dict(self) -> dict[str, Any]:
        return {
            "deployment": self.deployment,
            "chip": self.chip,
            "replica": self.replica,
            "stage": self.stage,
            "stages": self.stages,
            "tick_offset": self.tick_offset,
            "tp": {"rank": self.tp_rank, "size": self.tp_size, "group": list(self.tp_group)},
            "upstream": list(self.upstream),
            "downstream": list(self.downstream),
        }


@dataclass(frozen=True)
class ShardRef:
    """One chip's shard: the blob's address and the chip's binding.

    `shard_id` is the content address (the BLAKE3 of the blob, what agents load it under);
    `label` names the chip's place in the plan (deployment/replica/stage/rank) for people."""

    label: str
    chip: str
    size_bytes: int
    shard_id: str
    path: Path
    virtual: bool
    binding: ChipBinding


BlobWriter = Callable[[list["ShardProgram"]], dict[str, StoredBlob]]
"""Writes shard programs into the store; their blobs by recipe. In process by default;
`orchestrator.ray_tasks` fans the writes out over Ray tasks."""


@dataclass(frozen=True)
class ChipProgram:
    """One chip's unit of compilation: TP rank `rank` of `stage`, on `chip`, and its program."""

    stage: StagePlan
    rank: int
    chip: str
    program: ShardProgram


def compile_plan(
    plan: Plan,
    model_cfg: ModelConfig,
    source: WeightInput | None,
    store_dir: str | Path,
    *,
    virtual: bool | None = None,
    text: TextSpec | None = None,
    write_blobs: BlobWriter | None = None,
) -> list[ShardRef]:
    """Compile every chip's shard of `plan` into the store at `store_dir`.

    `virtual` None decides by size: a seeded model above `VIRTUAL_AUTO_BYTES` at the plan's
    precision compiles manifest-only shards; a checkpoint always compiles real ones.
    `text` (else a checkpoint directory's tokenizer.json, `read_text_spec`) goes into stage
    0's real shards (`shardformat.text`), for text in and out of Generate.
    `write_blobs` writes the distinct programs the store lacks (default: one after the other,
    here); whoever writes them, the result is the same, since a blob is content-addressed.
    Raises `InputError` when the plan does not belong to the model or the weights do not fit it.
    """
    check_plan(plan, model_cfg)
    store = ShardStore(store_dir)
    if virtual is None:
        virtual = _auto_virtual(plan, model_cfg, source)
    if text is None and not virtual and isinstance(source, (str, os.PathLike)):
        text = read_text_spec(source, model_cfg)
    with contextlib.ExitStack() as stack:
        weights = None if virtual else open_weight_source(source, model_cfg, plan.precision, stack)
        units = chip_programs(plan, model_cfg, weights, text)
        blobs: dict[str, StoredBlob] = {}
        missing: dict[str, ShardProgram] = {}
        for unit in units:
            recipe = unit.program.recipe
            if recipe in blobs or recipe in missing:
                continue
            found = store.lookup(recipe)
            if found is not None:
                blobs[recipe] = found
            else:
                missing[recipe] = unit.program
        if write_blobs is None:
            blobs |= {recipe: write_program(program, store) for recipe, program in missing.items()}
        elif missing:
            blobs |= write_blobs(list(missing.values()))
        refs = []
        for unit in units:
            blob = blobs[unit.program.recipe]
            refs.append(
                ShardRef(
                    label=f"{plan.deployment}/replica-{unit.stage.replica}/"
                    f"stage-{unit.stage.index}/rank-{unit.rank}",
                    chip=unit.chip,
                    size_bytes=blob.size_bytes,
                    shard_id=blob.shard_id,
                    path=blob.path,
                    virtual=virtual,
                    binding=binding(plan, unit.stage, unit.rank),
                )
            )
    return refs


def write_program(program: ShardProgram, store: ShardStore) -> StoredBlob:
    """Write one program's blob and index its recipe (what makes re-compiling a no-op)."""
    blob = program.write(store)
    store.remember(program.recipe, blob)
    return blob


def chip_programs(
    plan: Plan, cfg: ModelConfig, weights: WeightSource | None, text: TextSpec | None
) -> list[ChipProgram]:
    """Every chip's program, in plan order, each checked against the SRAM its plan charged.

    Building a program reads no weights (it names slices and computes the recipe), so this is
    cheap even for thousands of chips; writing the blobs is the work worth fanning out."""
    units = []
    for stage in plan.stages:
        for rank, chip in enumerate(stage.chips):
            program = ShardProgram.build(
                plan, cfg, stage, rank, weights, text if stage.index == 0 else None
            )
            check_sram(plan, cfg, stage, rank, program)
            units.append(ChipProgram(stage, rank, chip, program))
    return units


class PlanAccountingError(RuntimeError):
    """A compiled shard holds more than its plan charged the chip: a bug in the cost model."""


def held_bytes(plan: Plan, cfg: ModelConfig, stage: StagePlan, rank: int, weight_bytes: int) -> int:
    """What TP rank `rank` of `stage` holds in SRAM: its shard's weight bytes plus the KV cache
    of the KV heads its query heads read at the plan's width (a sliding window caches only its
    window)."""
    ops = _ops(cfg, plan.precision)
    kv = 0
    for spec in stage_pieces(cfg, stage.first, stage.last, len(stage.chips)):
        if spec.kind == "attention":
            first, last = kv_heads_of(cfg, *spec.ranks[rank])
            per_head = 2 * cfg.head_dim * PRECISION_BYTES[plan.precision]
            kv += (last - first) * per_head * ops[spec.op].cached_positions(plan.max_context)
    return weight_bytes + kv * plan.max_batch


@functools.lru_cache(maxsize=8)
def _ops(cfg: ModelConfig, precision: str) -> list[Op]:
    """`build_ops`, once per model and precision: `held_bytes` runs for every chip (2,036 for
    405B), and building the op list each time was half of a virtual compile."""
    return build_ops(cfg, precision)


def check_sram(
    plan: Plan, cfg: ModelConfig, stage: StagePlan, rank: int, shard: ShardProgram
) -> None:
    """Refuse to compile a shard that holds more than the plan charged its chip.

    Run on every compile (every plan of the test suite included): the plan's SRAM figure is
    what placement trusted, so a shard above it would overflow a real chip."""
    held = held_bytes(plan, cfg, stage, rank, shard.manifest.weight_bytes)
    if held > stage.sram_bytes_per_chip:
        raise PlanAccountingError(
            f"replica {stage.replica} stage {stage.index} rank {rank}: the shard holds {held:,} "
            f"bytes (weights {shard.manifest.weight_bytes:,} + KV cache), the plan charged "
            f"{stage.sram_bytes_per_chip:,}"
        )


def chip_manifest(ref: ShardRef, store_dir: str | Path) -> dict[str, Any]:
    """What an agent loads for a chip: the blob's manifest plus the chip's `binding`."""
    manifest = ShardStore(store_dir).manifest(ref.shard_id)
    return manifest.to_dict() | {"binding": ref.binding.to_dict()}


def binding(plan: Plan, stage: StagePlan, rank: int) -> ChipBinding:
    """The chip binding of TP rank `rank` of `stage`, with its ring neighbours."""
    ring = plan.replica_stages(stage.replica)
    position = next(i for i, s in enumerate(ring) if s.index == stage.index)
    return ChipBinding(
        deployment=plan.deployment,
        chip=stage.chips[rank],
        replica=stage.replica,
        stage=stage.index,
        stages=len(ring),
        tick_offset=stage.index,
        tp_rank=rank,
        tp_size=len(stage.chips),
        tp_group=stage.chips,
        upstream=ring[position - 1].chips,
        downstream=ring[(position + 1) % len(ring)].chips,
    )


def check_plan(plan: Plan, cfg: ModelConfig) -> None:
    """The plan's stages must tile the model's op list, in order, for every replica."""
    if plan.model != cfg.name:
        raise InputError(f"the plan is for model {plan.model!r}, not {cfg.name!r}", field="model")
    ops = build_ops(cfg, plan.precision)
    for replica in range(plan.replicas):
        cursor = (0, 0)
        for stage in plan.replica_stages(replica):
            where = f"stages[replica={replica}, index={stage.index}]"
            for cut in (stage.first, stage.last):
                if not (
                    0 <= cut.op < len(ops)
                    and ops[cut.op].name == cut.name
                    and 0 <= cut.chunk < cut.chunks
                ):
                    raise InputError(
                        f"op cut {cut.label} (op {cut.op}) is not an op of {cfg.name}", field=where
                    )
            if len(stage.chips) != plan.tensor_parallel:
                raise InputError(
                    f"has {len(stage.chips)} chips, tensorParallel is {plan.tensor_parallel}",
                    field=where,
                )
            specs = stage_pieces(cfg, stage.first, stage.last, plan.tensor_parallel)
            if specs[0].cursor != cursor:
                raise InputError(
                    f"starts at {stage.first.label}, but the previous stage "
                    f"ends before op {cursor[0]} chunk {cursor[1]}",
                    field=where,
                )
            cursor = specs[-1].next_cursor
        if cursor != (len(ops), 0):
            raise InputError(f"replica {replica} ends before the last op", field="stages")


def _auto_virtual(plan: Plan, cfg: ModelConfig, source: WeightInput | None) -> bool:
    if source is None:
        return True
    if isinstance(source, bool) or not isinstance(source, int):
        return False
    return cfg.parameter_count() * PRECISION_BYTES[plan.precision] > VIRTUAL_AUTO_BYTES


def open_weight_source(
    source: WeightInput | None, cfg: ModelConfig, precision: str, stack: contextlib.ExitStack
) -> WeightSource:
    if source is None:
        raise InputError(
            "real shards need weights: a seed or a checkpoint directory", field="source"
        )
    if isinstance(source, bool):
        raise InputError(f"a weight seed is an integer, got {source!r}", field="source")
    if isinstance(source, int):
        # int8/fp8: seeded fp16 weights, quantized as a checkpoint's would be
        return SeededWeights(cfg, source, PRECISION_DTYPES.get(precision, "F16"))
    if isinstance(source, (str, os.PathLike)):
        return stack.enter_context(open_checkpoint(source, cfg))
    return source


@dataclass(frozen=True)
class ShardProgram:
    """One chip's shard before it is written: manifest (digests pending) and tensor slices.

    Tensors are stored at the plan's precision (`shardformat.precision`), converted from the
    checkpoint's dtype on the way; an int8/fp8 matrix brings its per-row scales
    (`scale_name`), whose slice is the matrix's rows (`scales`).
    """

    manifest: Manifest
    slices: dict[str, TensorSlice]
    scales: dict[str, str]  # scale tensor name -> the quantized matrix it scales
    entries: tuple[TensorEntry, ...]
    weights: WeightSource | None
    recipe: str
    text: TextSpec | None = None  # stage 0: the tokenizer and EOS ids, in the blob's metadata

    @classmethod
    def build(
        cls,
        plan: Plan,
        cfg: ModelConfig,
        stage: StagePlan,
        rank: int,
        weights: WeightSource | None,
        text: TextSpec | None = None,
    ) -> ShardProgram:
        specs = stage_pieces(cfg, stage.first, stage.last, len(stage.chips))
        slices = _rank_slices(cfg, specs, rank)
        shapes = checkpoint_tensor_shapes(cfg)
        entries: list[TensorEntry] = []
        sources: dict[str, dict[str, Any]] = {}
        scales: dict[str, str] = {}
        for name, ts in sorted(slices.items()):
            shape = ts.shape(shapes[ts.source])
            dtype = storage_dtype(plan.precision, ts.source, len(shape))
            entries.append(TensorEntry(name, dtype, shape))
            sources[name] = ts.to_dict()
            if dtype in QUANTIZED_DTYPES:
                scale = scale_name(name)
                scales[scale] = name
                entries.append(TensorEntry(scale, "F32", shape[:1]))
                rows = (ts.start, ts.end) if ts.axis == 0 else (0, shape[0])
                sources[scale] = {"source": ts.source, "axis": 0, "range": list(rows)}
        entries.sort(key=lambda e: e.name)
        manifest = Manifest(
            model_name=cfg.name,
            config=cfg,
            precision=plan.precision,
            stage=stage.index,
            stages=plan.pipeline_stages,
            tick_offset=stage.index,
            tp_rank=rank,
            tp_size=len(stage.chips),
            max_batch=plan.max_batch,
            max_context=plan.max_context,
            ops=tuple(specs),
            tensors=tensor_infos(entries, sources),
            virtual=weights is None,
            declared_bytes=stage.sram_bytes_per_chip,
            weight_bytes=sum(e.nbytes for e in entries),
        )
        source = weights.fingerprint() if weights else {"kind": "virtual"}
        text = text if weights is not None else None
        recipe_of: dict[str, Any] = {"program": manifest.to_dict(), "source": source}
        if text is not None:
            recipe_of["text"] = hashlib.sha256(canonical_json(text.metadata()).encode()).hexdigest()
        recipe = hashlib.sha256(canonical_json(recipe_of).encode("ascii")).hexdigest()
        return cls(manifest, slices, scales, tuple(entries), weights, recipe, text)

    def manifest_with(self, digests: dict[str, str] | None) -> Manifest:
        return self.manifest.with_digests(digests)

    def write(self, store: ShardStore) -> StoredBlob:
        """Write the blob: a manifest-only one if virtual, else stream the slices."""
        if self.weights is None:
            prefix, _ = encode_header([], {MANIFEST_KEY: self.manifest.to_json()})
            return store.put_bytes(prefix)
        converter = _Converter(self.weights)
        dtypes = {e.name: e.dtype for e in self.entries}

        def produce(entry: TensorEntry) -> Any:
            if entry.name in self.scales:
                return converter.scales(self.slices[self.scales[entry.name]], dtypes)
            return converter.stored(self.slices[entry.name], entry.dtype, dtypes)

        extra = self.text.metadata() if self.text is not None else None
        return store.put(self.entries, lambda d: self.manifest_with(dict(d)), produce, extra)


class _Converter:
    """Checkpoint slices in the shard's dtype: widened to float32, then stored.

    Row scales of a matrix cut along its columns come from the whole checkpoint row (read
    once per tensor and kept: one float per row), so every plan quantizes alike."""

    def __init__(self, weights: WeightSource) -> None:
        self.weights = weights
        self._full_scales: dict[tuple[str, str], np.ndarray] = {}

    def values(self, ts: TensorSlice) -> np.ndarray:
        return decode_f32(self.weights.raw_slice(ts), self.weights.dtype_of(ts.source))

    def scales(self, ts: TensorSlice, dtypes: dict[str, str]) -> np.ndarray:
        dtype = dtypes[ts.name]
        if ts.axis != 1:  # whole rows: the slice's own maxima are the rows' maxima
            return row_scales(self.values(ts), dtype)
        key = (ts.source, dtype)
        if key not in self._full_scales:
            self._full_scales[key] = row_scales(
                self.values(TensorSlice(ts.source, ts.source)), dtype
            )
        return self._full_scales[key]

    def stored(self, ts: TensorSlice, dtype: str, dtypes: dict[str, str]) -> np.ndarray:
        values = self.values(ts)
        if dtype in QUANTIZED_DTYPES:
            return encode(values, dtype, self.scales(ts, dtypes))
        return encode(values, dtype)


def _rank_slices(cfg: ModelConfig, specs: list[PieceSpec], rank: int) -> dict[str, TensorSlice]:
    """Every tensor slice the rank needs, by shard name; shared norms appear once."""
    slices: dict[str, TensorSlice] = {}
    for spec in specs:
        for ts in piece_tensors(cfg, spec, rank).values():
            if slices.setdefault(ts.name, ts) != ts:
                raise AssertionError(f"two different slices named {ts.name} in one shard")
    return slices
