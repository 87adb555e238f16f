"""Shard compiler and store: one content-addressed blob per distinct shard, verified, idempotent."""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from agents.executor import load_stage_program, read_shard, verify_shard_tensors
from orchestrator.compiler import ShardProgram, ShardRef, chip_manifest, compile_plan
from orchestrator.shard_store import ShardStore
from orchestrator.weights import SeededWeights, write_checkpoint
from placement.errors import InputError
from placement.models import MODEL_PRESETS
from placement.plan import Plan
from placement.planner import PlanRequest, make_plan
from placement.topology import preset_topology
from shardformat.address import shard_id_of
from shardformat.codec import TensorEntry
from shardformat.errors import ExecutionError
from shardformat.manifest import MANIFEST_KEY, Manifest, TensorInfo

TINY = MODEL_PRESETS["tiny-llama"]


def tiny_plan(tp: int | None, replicas: int = 1, precision: str = "fp16") -> Plan:
    request = PlanRequest(
        "demo",
        TINY,
        precision,
        replicas=replicas,
        max_context=64,
        max_batch=4,
        tensor_parallel=tp,
        spread="none",
        spares_per_rack=0,
    )
    return make_plan(request, preset_topology(2, "dev"))


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_compile_tp1_two_replicas(tmp_path: Path) -> None:
    plan = tiny_plan(1, replicas=2)
    assert plan.pipeline_stages > 4
    refs = compile_plan(plan, TINY, 11, tmp_path)
    assert [r.chip for r in refs] == plan.chips()
    store = ShardStore(tmp_path)
    by_stage: dict[int, set[str]] = {}
    for ref in refs:
        assert ref.path == tmp_path / "blake3" / f"{ref.shard_id}.safetensors"
        assert ref.size_bytes == ref.path.stat().st_size and not ref.virtual
        by_stage.setdefault(ref.binding.stage, set()).add(ref.shard_id)
    # Replicas run identical programs: one blob per stage, shared by both replicas' chips.
    assert all(len(digests) == 1 for digests in by_stage.values())
    assert len(list((tmp_path / "blake3").iterdir())) == plan.pipeline_stages
    for digest in {r.shard_id for r in refs}:
        assert store.verify(digest) and shard_id_of(store.read(digest)) == digest
        manifest, view = read_shard(store.read(digest))
        assert verify_shard_tensors(manifest, view.tensors) == []
    assert not list((tmp_path / "tmp").iterdir())


def test_manifest_and_binding(tmp_path: Path) -> None:
    plan = tiny_plan(2)
    refs = compile_plan(plan, TINY, 11, tmp_path)
    stages = plan.replica_stages(0)
    ref = next(r for r in refs if r.binding.stage == 0 and r.binding.tp_rank == 1)
    full = chip_manifest(ref, tmp_path)
    assert full["format"] == "lockstep.shard/1"
    assert full["model"] == {"name": "tiny-llama", "config": TINY.to_dict()}
    assert full["precision"] == "fp16" and full["virtual"] is False
    assert (full["stage"], full["stages"], full["tick_offset"]) == (0, len(stages), 0)
    assert full["tp"] == {"rank": 1, "size": 2}
    assert full["serving"] == {"max_batch": 4, "max_context": 64}
    assert full["declared_bytes"] == stages[0].sram_bytes_per_chip
    first = full["ops"][0]
    assert first["name"] == "embed" and first["rank_units"] == first["ranks"][1]
    binding = full["binding"]
    assert binding["tp"]["group"] == list(stages[0].chips)
    assert binding["upstream"] == list(stages[-1].chips)  # the ring closes
    assert binding["downstream"] == list(stages[1].chips)
    info = full["tensors"]["model.embed_tokens.weight"]
    assert info["dtype"] == "F16" and len(info["sha256"]) == 64
    with safe_open(str(ref.path), framework="numpy") as f:
        assert json.loads(f.metadata()[MANIFEST_KEY])["tensors"] == full["tensors"]
        assert list(f.get_slice("model.embed_tokens.weight").get_shape()) == info["shape"]


def test_tp_slices_reassemble_the_checkpoint(tmp_path: Path) -> None:
    plan = tiny_plan(2)
    refs = compile_plan(plan, TINY, 11, tmp_path)
    seeded = SeededWeights(TINY, 11, "F16")
    stage = next(
        s
        for s in plan.replica_stages(0)
        if any(n.endswith("attention") for n in (s.first.name, s.last.name))
        and s.first.op < s.last.op
    )
    ranks = [read_shard(r.path.read_bytes()) for r in refs if r.binding.stage == stage.index]
    spec = next(o for o in ranks[0][0].ops if o.kind == "attention")
    layer = spec.layer
    q_name = f"model.layers.{layer}.self_attn.q_proj.weight"
    o_name = f"model.layers.{layer}.self_attn.o_proj.weight"
    lo, hi = (u * TINY.head_dim for u in (spec.start, spec.end))  # units are query heads
    q = np.concatenate([view.tensors[q_name] for _, view in ranks if q_name in view.tensors])
    o = np.concatenate([view.tensors[o_name] for _, view in ranks if o_name in view.tensors], 1)
    assert np.array_equal(q, seeded[q_name][lo:hi])
    assert np.array_equal(o, seeded[o_name][:, lo:hi])
    norm = f"model.layers.{layer}.input_layernorm.weight"
    assert all(np.array_equal(view.tensors[norm], seeded[norm]) for _, view in ranks)


def test_recompile_is_a_no_op(tmp_path: Path) -> None:
    plan = tiny_plan(1)
    first = compile_plan(plan, TINY, 11, tmp_path)
    before = _tree(tmp_path)
    assert compile_plan(plan, TINY, 11, tmp_path) == first
    assert _tree(tmp_path) == before  # nothing rewritten, nothing added
    # Without the recipe index the blobs are rebuilt — to the same addresses.
    for recipe in (tmp_path / "recipes").iterdir():
        recipe.unlink()
    assert [r.shard_id for r in compile_plan(plan, TINY, 11, tmp_path)] == [
        r.shard_id for r in first
    ]
    assert {k: v for k, v in _tree(tmp_path).items() if k.startswith("blake3")} == {
        k: v for k, v in before.items() if k.startswith("blake3")
    }


def test_a_removed_corrupt_blob_is_rebuilt_to_the_same_address(tmp_path: Path) -> None:
    """What the controller does when an agent refuses a blob with DATA_LOSS and the store's
    copy is bad: remove it; the next compile misses its recipe and writes it again."""
    plan = tiny_plan(1)
    first = compile_plan(plan, TINY, 11, tmp_path)
    store = ShardStore(tmp_path)
    victim = first[0].shard_id
    data = bytearray(store.read(victim))
    data[len(data) // 2] ^= 0xFF
    store.blob_path(victim).write_bytes(bytes(data))
    assert not store.verify(victim)
    assert compile_plan(plan, TINY, 11, tmp_path) == first  # same size: the lookup is fooled
    assert not store.verify(victim)
    store.remove(victim)
    store.remove(victim)  # gone already: nothing to do
    assert compile_plan(plan, TINY, 11, tmp_path) == first
    assert store.verify(victim)


def test_checkpoint_and_seed_compile_to_the_same_blobs(tmp_path: Path) -> None:
    plan = tiny_plan(4)
    write_checkpoint(TINY, tmp_path / "ckpt", seed=11, max_file_bytes=4 << 20)
    from_seed = compile_plan(plan, TINY, 11, tmp_path / "a")
    from_ckpt = compile_plan(plan, TINY, tmp_path / "ckpt", tmp_path / "b")
    assert [r.shard_id for r in from_seed] == [r.shard_id for r in from_ckpt]


def test_virtual_shards_for_a_70b_model(tmp_path: Path) -> None:
    cfg = MODEL_PRESETS["llama-3-70b"]
    request = PlanRequest(
        "big",
        cfg,
        "int8",
        replicas=1,
        max_context=2048,
        max_batch=1,
        tensor_parallel=None,
        spread="none",
        spares_per_rack=0,
    )
    plan = make_plan(request, preset_topology(8, "groq-rack"))
    refs = compile_plan(plan, cfg, 0, tmp_path)  # a seed: too large, so virtual automatically
    assert len(refs) == plan.chips_used > 300
    for ref, stage in zip(refs, plan.stages, strict=True):
        assert ref.virtual and ref.size_bytes < 8192  # a manifest, no weights
        with safe_open(str(ref.path), framework="numpy") as f:
            assert list(f.keys()) == []
            manifest = json.loads(f.metadata()[MANIFEST_KEY])
        assert manifest["virtual"] is True
        assert manifest["declared_bytes"] == stage.sram_bytes_per_chip
        assert 0 < manifest["weight_bytes"] <= stage.sram_bytes_per_chip
        tensors = manifest["tensors"].values()
        assert all(t["sha256"] is None for t in tensors)
        # the dtypes real int8 shards would hold: I8 matrices with F32 row scales, F16 norms
        assert {(len(t["shape"]), t["dtype"]) for t in tensors} <= {
            (2, "I8"),
            (1, "F32"),
            (1, "F16"),
        }
        assert any(t["dtype"] == "I8" for t in tensors)
    manifest = ShardStore(tmp_path).manifest(refs[5].shard_id)
    with pytest.raises(ExecutionError, match="virtual"):
        load_stage_program(manifest, {})


def test_plan_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not 'llama-2-7b'"):
        compile_plan(tiny_plan(1), MODEL_PRESETS["llama-2-7b"], 0, tmp_path)
    refs = compile_plan(tiny_plan(1, precision="int8"), TINY, 0, tmp_path, virtual=True)
    assert all(r.virtual for r in refs)


def test_store_never_exposes_a_partial_blob(tmp_path: Path) -> None:
    store = ShardStore(tmp_path)
    entries = [TensorEntry("a", "F32", (4,)), TensorEntry("b", "F32", (4,))]

    def produce(entry: TensorEntry) -> np.ndarray:
        if entry.name == "b":
            raise OSError("disk on fire")
        return np.zeros(4, np.float32)

    def manifest_for(digests: Mapping[str, str]) -> Manifest:
        base = ShardProgram.build(tiny_plan(1), TINY, tiny_plan(1).stages[0], 0, None).manifest
        tensors = {e.name: TensorInfo("F32", (4,), e.name, None, (0, 4), None) for e in entries}
        return dataclasses.replace(base, tensors=tensors, virtual=False).with_digests(digests)

    with pytest.raises(OSError, match="disk on fire"):
        store.put(entries, manifest_for, produce)
    assert not list(store.blobs.iterdir()) and not list(store.tmp.iterdir())
    blob = store.put(entries, manifest_for, lambda e: np.full(4, 1.5, np.float32))
    assert store.verify(blob.shard_id) and blob.path.parent.name == "blake3"
    tensors = store.manifest(blob.shard_id).tensors
    assert (
        tensors["a"].sha256
        == tensors["b"].sha256
        == store.manifest(blob.shard_id).tensors["a"].sha256
    )
    assert tensors["a"].sha256 is not None and len(tensors["a"].sha256) == 64
    with open(blob.path, "r+b") as f:  # flip one byte of tensor data
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    assert not store.verify(blob.shard_id)


def test_shard_ref_shape() -> None:
    assert [f for f in ShardRef.__dataclass_fields__][:6] == [
        "label",
        "chip",
        "size_bytes",
        "shard_id",
        "path",
        "virtual",
    ]


@pytest.mark.parametrize(
    ("model", "profile", "racks", "tp", "precision", "context", "batch"),
    [
        ("tiny-llama", "dev", 4, 8, "fp16", 1024, 2),
        ("tiny-llama", "dev", 4, 4, "fp16", 256, 4),
        ("tiny-llama", "dev", 4, 2, "fp16", 512, 8),
        ("llama-3-8b", "groq-rack", 8, 8, "fp16", 8192, 8),
        ("mixtral-8x7b", "groq-rack", 20, 8, "fp16", 8192, 16),
        # TP 1: attention cut between the query heads of one KV group.
        ("llama-3-8b", "groq-rack", 8, 1, "int8", 4096, 8),
        ("qwen2-7b", "groq-rack", 8, 1, "int8", 4096, 4),
        ("llama-3-70b", "groq-rack", 8, 1, "int8", 4096, 8),
    ],
)
def test_every_rank_holds_no_more_than_the_plan_declares(
    model: str, profile: str, racks: int, tp: int, precision: str, context: int, batch: int
) -> None:
    """What the compiled shards really put on each TP rank (weight slices + the KV cache of
    the KV heads its query heads read) stays within the SRAM the plan declares for the chip,
    itself within capacity — also where a stage starts inside a KV group and holds that
    group's K/V again."""
    from orchestrator.compiler import ShardProgram
    from placement.models import PRECISION_BYTES, kv_heads_of
    from shardformat.layout import stage_pieces

    cfg = MODEL_PRESETS[model]
    topo = preset_topology(racks, profile)
    request = PlanRequest(
        "r", cfg, precision, 1, context, batch, tp, spread="none", spares_per_rack=0
    )
    plan = make_plan(request, topo)
    width = PRECISION_BYTES[precision]
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    if model in ("qwen2-7b", "llama-3-70b"):  # plans known to start a stage inside a group
        inside = [
            s
            for s in plan.stages
            if s.first.name.endswith("attention") and s.first.chunks > cfg.num_key_value_heads
        ]
        assert any(
            spec.start % group for s in inside for spec in stage_pieces(cfg, s.first, s.last, 1)[:1]
        ), "no stage starts inside a KV group"
    for stage in plan.stages:
        assert stage.sram_bytes_per_chip <= topo.profile.usable_sram_bytes
        for rank in range(len(stage.chips)):
            program = ShardProgram.build(plan, cfg, stage, rank, None)
            kv = 0
            for piece in stage_pieces(cfg, stage.first, stage.last, len(stage.chips)):
                if piece.kind == "attention":
                    first, last = kv_heads_of(cfg, *piece.ranks[rank])
                    kv += (last - first) * cfg.head_dim * 2 * width * context * batch
            held = program.manifest.weight_bytes + kv
            assert held <= stage.sram_bytes_per_chip, (stage.index, rank)
