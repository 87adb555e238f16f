"""Shards hold the deployment's precision; quantized shards run, and their error is bounded.

Measured on the golden models (tests/golden, 2 layers, hidden 64; the fp16 model there is the
float32 one, its weights are fp16-exact), max |Δlogit| / max |logit| over every position of
both prompts against the fp16 model, and the share of positions whose top token agrees:

    bf16  ≤ 0.62 %            top-1 100 %
    int8  ≤ 1.7 %             top-1 ≥ 21/22 per case
    fp8   ≤ 16.5 % (Mixtral: a flipped expert choice; dense ≤ 11 %)   top-1 ≥ 19/22

and on tiny-llama (8 layers, hidden 256, 39 positions): bf16 0.47 %, int8 1.5 %, fp8 4.9 %.
e4m3 keeps 3 mantissa bits (≈ 6 % per weight), int8 per-row scales ≈ 0.4 % of the row's
largest weight, bf16 8 bits (0.4 %). The bounds below leave about 1.5x room.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from golden.seeded import seeded_tensors
from safetensors.numpy import save_file
from test_golden import FIXTURES, load_case

from agents.activation import Activation
from agents.executor import (
    ReferenceExecutor,
    Stepper,
    TensorParallelGroup,
    load_shard,
    read_shard,
    run_pipeline,
)
from orchestrator.compiler import PlanAccountingError, ShardProgram, check_sram, compile_plan
from orchestrator.weights import to_bf16_bits
from placement.models import ModelConfig, build_ops
from placement.plan import Plan
from placement.planner import PlanRequest, make_plan
from placement.topology import topology_from_dict
from shardformat.errors import ExecutionError
from shardformat.layout import plan_layout
from shardformat.precision import (
    FP8_E4M3_VALUES,
    DeployedTensors,
    dequantize,
    fp8_e4m3_bits,
    quantize,
    row_scales,
    scale_name,
    storage_dtype,
)

PRECISIONS = ("fp16", "bf16", "int8", "fp8")
ERROR_BOUNDS = {"bf16": 1e-2, "int8": 2.5e-2, "fp8": 0.25}
TOP1_BOUNDS = {"bf16": 1.0, "int8": 0.9, "fp8": 0.8}


# --- the number formats --------------------------------------------------------------------


def nearest_e4m3(value: float) -> int:
    """The oracle: the e4m3 code nearest `value`, ties to the even code (brute force)."""
    magnitude = abs(value)
    finite = [(abs(float(v) - magnitude), code) for code, v in enumerate(FP8_E4M3_VALUES[:127])]
    best = min(d for d, _ in finite)
    codes = [c for d, c in finite if d == best]
    code = next((c for c in codes if c % 2 == 0), codes[0])
    return code | (0x80 if np.signbit(value) else 0)


def test_fp8_e4m3_table() -> None:
    assert FP8_E4M3_VALUES[0x7E] == 448.0 and FP8_E4M3_VALUES[0x01] == 2.0**-9
    assert np.isnan(FP8_E4M3_VALUES[0x7F]) and np.isnan(FP8_E4M3_VALUES[0xFF])
    assert FP8_E4M3_VALUES[0x08] == 2.0**-6 and FP8_E4M3_VALUES[0xB8] == -1.0


def test_fp8_rounds_to_nearest_even_like_the_oracle() -> None:
    """Random values over every binade and subnormals, all midpoints (ties), and the codes
    themselves. (Checked once against torch.float8_e4m3fn on 10^6 values: identical.)"""
    rng = np.random.default_rng(5)
    values = np.concatenate(
        [rng.standard_normal(300).astype(np.float32) * s for s in (1e-3, 0.05, 1.0, 40.0)]
    )
    mids = (FP8_E4M3_VALUES[:126].astype(np.float64) + FP8_E4M3_VALUES[1:127]) / 2
    values = np.concatenate([values, mids, -mids, FP8_E4M3_VALUES[:127]]).astype(np.float32)
    values = np.clip(values, -448, 448)
    got = fp8_e4m3_bits(values)
    want = np.array([nearest_e4m3(float(v)) for v in values], dtype=np.uint8)
    assert np.array_equal(got, want)
    with pytest.raises(ExecutionError, match="448"):
        fp8_e4m3_bits(np.array([449.0], np.float32))


@pytest.mark.parametrize("dtype", ["I8", "F8_E4M3"])
def test_quantization_is_per_row_and_symmetric(dtype: str) -> None:
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 40)) * np.arange(1, 7)[:, None]).astype(np.float32)
    w[3] = 0.0  # an all-zero row
    scales = row_scales(w, dtype)
    codes = quantize(w, dtype, scales)
    back = dequantize(codes, dtype, scales)
    top = 127 if dtype == "I8" else 448
    assert np.allclose(np.abs(back).max(axis=1), np.abs(w).max(axis=1), rtol=1e-6)
    assert np.all(back[3] == 0)
    if dtype == "I8":
        assert codes.dtype == np.int8 and np.abs(codes).max() == top
        assert np.all(np.abs(back - w) <= scales[:, None] / 2 * (1 + 1e-6))
    else:  # e4m3: relative error ≤ 2^-4 above the subnormal range
        big = np.abs(w) >= scales[:, None] * 2.0**-6
        assert np.all(np.abs(back - w)[big] <= np.abs(w)[big] * 2.0**-4 + 1e-12)
    with pytest.raises(ExecutionError, match="do not fit"):
        dequantize(codes, dtype, scales[:3])


def test_storage_dtypes() -> None:
    assert storage_dtype("int8", "model.layers.0.mlp.up_proj.weight", 2) == "I8"
    assert storage_dtype("fp8", "lm_head.weight", 2) == "F8_E4M3"
    assert storage_dtype("int8", "model.norm.weight", 1) == "F16"
    assert storage_dtype("int8", "model.layers.0.self_attn.q_proj.bias", 1) == "F16"
    assert storage_dtype("fp8", "model.layers.0.block_sparse_moe.gate.weight", 2) == "F16"
    assert storage_dtype("bf16", "model.norm.weight", 1) == "BF16"


# --- compiled shards -----------------------------------------------------------------------


def golden_tensors(golden: dict[str, Any]) -> dict[str, np.ndarray]:
    shapes = {k: tuple(v) for k, v in golden["tensors"].items()}
    return seeded_tensors(shapes, golden["seed"])


def write_checkpoint_dir(
    name: str, golden: dict[str, Any], out: Path, dtype: str
) -> dict[str, np.ndarray]:
    """The golden model as a checkpoint stored in `dtype` (F32 or BF16); returns its values."""
    out.mkdir(parents=True)
    (out / "config.json").write_text((FIXTURES / name / "config.json").read_text())
    tensors = golden_tensors(golden)
    if dtype == "BF16":
        # safetensors.numpy has no bfloat16: write the header by hand around uint16 bits
        bits = {k: to_bf16_bits(v) for k, v in tensors.items()}
        header: dict[str, Any] = {}
        offset = 0
        for key, array in bits.items():
            header[key] = {
                "dtype": "BF16",
                "shape": list(array.shape),
                "data_offsets": [offset, offset + array.nbytes],
            }
            offset += array.nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(out / "model.safetensors", "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)
            for array in bits.values():
                f.write(array.tobytes())
        return {k: (v.astype(np.uint32) << 16).view(np.float32) for k, v in bits.items()}
    save_file(tensors, str(out / "model.safetensors"))
    return tensors


def small_plan(name: str, cfg: ModelConfig, precision: str, sram_kib: int) -> Plan:
    topo = topology_from_dict(
        {"profile": {"base": "dev", "sram_bytes": sram_kib << 10}, "racks": 1}, source="t"
    )
    return make_plan(PlanRequest(name, cfg, precision, 1, 32, 1, spares_per_rack=0), topo)


def stages_of(plan: Plan, refs: list[Any]) -> list[Stepper]:
    stages: list[Stepper] = []
    for stage in plan.replica_stages(0):
        programs = [load_shard(r.path.read_bytes()) for r in refs if r.binding.stage == stage.index]
        stages.append(programs[0] if len(programs) == 1 else TensorParallelGroup(programs))
    return stages


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize(
    ("name", "checkpoint_dtype", "sram_kib"),
    [
        ("qwen2", "F32", 48),
        ("llama-tied-bias", "BF16", 96),
        ("mixtral", "F32", 48),
        ("qwen3", "BF16", 48),
    ],
)
def test_shards_hold_the_deployment_precision(
    name: str, checkpoint_dtype: str, sram_kib: int, precision: str, tmp_path: Path
) -> None:
    """Whatever the checkpoint's dtype, every shard tensor is stored as the precision says,
    and the stage-by-stage pipeline equals, bit for bit, the reference executor run on the
    weights as that precision holds them (`DeployedTensors`), at the plan's layout."""
    cfg, golden = load_case(name)
    values = write_checkpoint_dir(name, golden, tmp_path / "ckpt", checkpoint_dtype)
    plan = small_plan(name, cfg, precision, sram_kib)
    refs = compile_plan(plan, cfg, tmp_path / "ckpt", tmp_path / "store")
    for ref in refs:
        manifest, view = read_shard(ref.path.read_bytes())
        assert manifest.precision == precision
        for tensor, info in manifest.tensors.items():
            if tensor.endswith("_scale"):
                assert info.dtype == "F32" and scale_name(tensor[: -len("_scale")]) == tensor
                continue
            assert info.dtype == storage_dtype(precision, info.source, len(info.shape))
            if info.dtype in ("I8", "F8_E4M3"):
                assert scale_name(tensor) in manifest.tensors
        assert manifest.weight_bytes == sum(a.nbytes for a in view.tensors.values())
    reference = ReferenceExecutor(
        cfg, DeployedTensors(values, precision), max_context=32, layout=plan_layout(cfg, plan)
    )
    stages = stages_of(plan, refs)
    sequence = [1, 5, 17, 42, 7, 9, 30, 2]
    n = len(sequence)
    batch = Activation.for_tokens([0] * n, range(n), sequence)
    got = run_pipeline(stages, batch, via_bytes=True).require_logits()
    assert np.array_equal(got, reference.step(batch).require_logits())


@pytest.mark.parametrize("precision", ["bf16", "int8", "fp8"])
@pytest.mark.parametrize("name", ["llama-default", "mixtral", "qwen2-window", "qwen3"])
def test_logit_error_against_the_fp16_model(name: str, precision: str) -> None:
    cfg, golden = load_case(name)
    tensors = golden_tensors(golden)
    worst, agree, total = 0.0, 0, 0
    for entry in golden["prompts"]:
        sequence = entry["prompt"] + entry["generated"][:-1]
        fp16 = ReferenceExecutor(cfg, DeployedTensors(tensors, "fp16"), max_context=32)
        quantized = ReferenceExecutor(cfg, DeployedTensors(tensors, precision), max_context=32)
        want, got = fp16.prefill(sequence), quantized.prefill(sequence)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
        agree += int((got.argmax(axis=1) == want.argmax(axis=1)).sum())
        total += len(sequence)
    assert 0 < worst <= ERROR_BOUNDS[precision]
    assert agree / total >= TOP1_BOUNDS[precision]


def test_fp16_from_f32_is_exact_on_fp16_values() -> None:
    """The golden weights are fp16-exact, so the fp16 deployment is the float32 model."""
    _, golden = load_case("qwen2")
    tensors = golden_tensors(golden)
    deployed = DeployedTensors(tensors, "fp16")
    assert all(np.array_equal(deployed[k], tensors[k]) for k in tensors)


# --- the plan charges what the shards hold -------------------------------------------------


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("name", ["llama-tied-bias", "qwen2", "qwen3", "mixtral", "mistral-window"])
@pytest.mark.parametrize("sram_kib", [96, 48])
def test_plan_never_charges_less_than_a_chip_holds(
    name: str, precision: str, sram_kib: int
) -> None:
    """Per chip: the shard's bytes (at the precision, with scales, biases, a tied LM head's
    copy of the embedding and replicated norms) plus its KV cache ≤ the plan's SRAM figure.

    `compile_plan` runs the same check on every compile (`check_sram`); this covers every
    architecture at every precision without writing weights."""
    cfg, _ = load_case(name)
    plan = small_plan(name, cfg, precision, sram_kib)
    for stage in plan.stages:
        for rank in range(len(stage.chips)):
            check_sram(plan, cfg, stage, rank, ShardProgram.build(plan, cfg, stage, rank, None))


def test_an_undercharging_plan_is_refused_at_compile(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg, golden = load_case("llama-tied-bias")
    write_checkpoint_dir("llama-tied-bias", golden, tmp_path / "ckpt", "F32")
    plan = small_plan("llama-tied-bias", cfg, "int8", 96)
    last = plan.stages[-1]
    short = replace(plan, stages=(*plan.stages[:-1], replace(last, sram_bytes_per_chip=1000)))
    with pytest.raises(PlanAccountingError, match="the plan charged 1,000"):
        compile_plan(short, cfg, tmp_path / "ckpt", tmp_path / "store")


def test_a_tied_lm_head_is_charged_its_copy_of_the_embedding() -> None:
    cfg, _ = load_case("llama-tied-bias")
    ops = build_ops(cfg, "fp16")
    assert ops[-1].kind == "lm_head"
    assert ops[-1].param_bytes == cfg.vocab_size * cfg.hidden_size * 2
    assert cfg.parameter_count() == load_case("llama-tied-bias")[1]["num_parameters"]


def test_executor_bench_reports_rates_and_errors() -> None:
    """`python -m bench.executor`: its last line is one JSON object with a rate and an error
    for every architecture and precision, and the text demo."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "bench.executor", "--tokens", "2", "--repeats", "1"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(summary["results"]) >= {"qwen3", "mixtral", "mistral-window", "tiny-llama"}
    for rows in summary["results"].values():
        assert set(rows) == set(PRECISIONS) and all(r["tokens_per_s"] > 0 for r in rows.values())
        assert rows["fp16"]["max_rel_logit_error"] == 0.0
    for precision, worst in summary["worst_rel_logit_error_vs_fp16"].items():
        assert 0 < worst <= ERROR_BOUNDS[precision]
    assert summary["text_demo"]["tokens"] and summary["text_demo"]["prompt_ids"]


def test_a_quantized_shard_without_its_scales_does_not_load(tmp_path: Path) -> None:
    from agents.executor import load_stage_program

    cfg, golden = load_case("qwen2")
    write_checkpoint_dir("qwen2", golden, tmp_path / "ckpt", "F32")
    plan = small_plan("qwen2", cfg, "fp8", 96)
    refs = compile_plan(plan, cfg, tmp_path / "ckpt", tmp_path / "store")
    manifest, view = read_shard(refs[0].path.read_bytes())
    tensors = dict(view.tensors)
    scale = next(name for name in tensors if name.endswith("_scale"))
    del tensors[scale]
    with pytest.raises(ExecutionError, match="row scales"):
        load_stage_program(manifest, tensors)
    tensors[scale] = view.tensors[scale][:-1]
    with pytest.raises(ExecutionError, match="do not fit"):
        load_stage_program(manifest, tensors)
    matrix = scale[: -len("_scale")]
    tensors = dict(view.tensors)
    tensors[matrix] = np.full_like(view.tensors[matrix], 0x7F)  # the e4m3 NaN code
    with pytest.raises(ExecutionError, match="NaN"):
        load_stage_program(manifest, tensors)
