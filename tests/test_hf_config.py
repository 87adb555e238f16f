"""Hugging Face config import: every field that changes the math is read or refused.

Also: preset parameter counts against the published ones, rope scaling tables, and the
sliding-window KV cache in the planner's memory model.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agents.kernels import rope_inv_freq, rope_table
from placement.cost import Workload, op_sram_bytes
from placement.errors import InputError
from placement.models import (
    MODEL_PRESETS,
    SUPPORTED_ARCHITECTURES,
    ModelConfig,
    RopeScaling,
    build_ops,
    model_from_hf_config,
    to_hf_config,
)

PUBLISHED_PARAMETERS = {
    # Sum of the tensors in each model's published safetensors (tied embeddings once), as the
    # Hugging Face model pages report them.
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "llama-3.1-405b": 405_853_388_800,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3.2-3b": 3_212_749_824,
    "mistral-7b": 7_241_732_096,
    "mistral-7b-v0.3": 7_248_023_552,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2-7b": 7_615_616_512,
    "qwen2.5-0.5b": 494_032_768,
    "qwen2.5-7b": 7_615_616_512,
    "qwen3-0.6b": 596_049_920,  # "0.6B; 0.44B non-embedding" (Qwen3 model card)
    "qwen3-8b": 8_190_735_360,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS))
def test_preset_parameter_counts_match_published(name: str) -> None:
    got = MODEL_PRESETS[name].parameter_count()
    assert abs(got - PUBLISHED_PARAMETERS[name]) <= 0.005 * PUBLISHED_PARAMETERS[name]


def test_qwen_extras_are_counted() -> None:
    """q/k/v biases (Qwen2) and q/k norms (Qwen3) are part of the counts above."""
    qwen = MODEL_PRESETS["qwen2.5-7b"]
    plain = replace(qwen, qkv_bias=False)
    per_layer = qwen.num_attention_heads * qwen.head_dim + 2 * 4 * qwen.head_dim
    assert qwen.parameter_count() - plain.parameter_count() == 28 * per_layer
    qwen3 = MODEL_PRESETS["qwen3-8b"]
    no_norm = replace(qwen3, qk_norm=False)
    assert qwen3.parameter_count() - no_norm.parameter_count() == 36 * 2 * 128


LLAMA_31_4X: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def write(tmp_path: Path, raw: dict[str, Any]) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw, indent=2))
    return path


def test_llama_31_config_equals_preset_in_both_spellings(tmp_path: Path) -> None:
    preset = MODEL_PRESETS["llama-3.1-8b"]
    four = model_from_hf_config(write(tmp_path, LLAMA_31_4X), name=preset.name)
    assert four == preset
    five = dict(LLAMA_31_4X)
    rope = five.pop("rope_scaling") | {"rope_theta": five.pop("rope_theta")}
    five["rope_parameters"] = rope
    assert model_from_hf_config(write(tmp_path, five), name=preset.name) == preset
    old_alias = LLAMA_31_4X | {"rope_scaling": {**LLAMA_31_4X["rope_scaling"], "type": "llama3"}}
    del old_alias["rope_scaling"]["rope_type"]
    assert model_from_hf_config(write(tmp_path, old_alias), name=preset.name) == preset


def test_absent_keys_take_the_architecture_defaults_of_transformers(tmp_path: Path) -> None:
    base = {k: LLAMA_31_4X[k] for k in ("vocab_size", "hidden_size", "intermediate_size")}
    base |= {"num_hidden_layers": 2, "num_attention_heads": 32, "num_key_value_heads": 8}
    mistral = model_from_hf_config(write(tmp_path, base | {"model_type": "mistral"}))
    assert mistral.attention_window == 4096 and mistral.rms_norm_eps == 1e-6
    mixtral = model_from_hf_config(write(tmp_path, base | {"model_type": "mixtral"}))
    assert mixtral.rope_theta == 1e6 and mixtral.rms_norm_eps == 1e-5
    assert (mixtral.num_local_experts, mixtral.num_experts_per_tok) == (8, 2)
    llama = model_from_hf_config(write(tmp_path, base | {"model_type": "llama"}))
    assert llama.max_position_embeddings == 2048 and llama.rope_theta == 1e4
    qwen2 = model_from_hf_config(write(tmp_path, base | {"model_type": "qwen2"}))
    assert qwen2.qkv_bias and not qwen2.o_bias and qwen2.attention_window == 0
    qwen3 = model_from_hf_config(write(tmp_path, base | {"model_type": "qwen3"}))
    assert qwen3.qk_norm and not qwen3.qkv_bias


@pytest.mark.parametrize(
    ("overrides", "key", "fragment"),
    [
        (
            {"architectures": ["Qwen2MoeForCausalLM"]},
            "architectures",
            "supported: " + ", ".join(SUPPORTED_ARCHITECTURES),
        ),
        ({"model_type": "mistral"}, "model_type", "does not match architecture"),
        ({"hidden_act": "gelu"}, "hidden_act", "supported: silu, swish"),
        ({"mlp_bias": True}, "mlp_bias", "supported: false"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor", "supported: 1.0"),
        (
            {"rope_scaling": {"rope_type": "longrope", "factor": 4.0}},
            "rope_scaling.rope_type",
            "'longrope' is not supported; supported: default, linear, dynamic, llama3, yarn",
        ),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0}},
            "rope_scaling.low_freq_factor",
            "required for rope type 'llama3'",
        ),
        (
            {"rope_scaling": None, "rope_parameters": {"rope_theta": 1e6, "rope_type": "default"}},
            "rope_parameters.rope_theta",
            "disagrees with the top-level rope_theta 500000.0",
        ),
        (
            {"rope_scaling": {"full_attention": {"rope_type": "default"}}},
            "rope_scaling",
            "per-layer-type",
        ),
        ({"rope_scaling": {"rope_type": "linear"}}, "rope_scaling.factor", "required"),
        ({"rope_scaling": {"rope_type": "linear", "factor": "2"}}, "factor", "must be a number"),
        ({"num_local_experts": 8}, "num_local_experts", "only supported with Mixtral"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings", "must be true or false"),
        ({"attention_bias": 1}, "attention_bias", "must be true or false"),
        ({"rms_norm_eps": -1}, "rms_norm_eps", "positive"),
        ({"head_dim": 7}, "head_dim", "even head_dim"),
    ],
)
def test_refusals_name_file_line_key_value_and_what_is_supported(
    tmp_path: Path, overrides: dict[str, Any], key: str, fragment: str
) -> None:
    path = write(tmp_path, LLAMA_31_4X | overrides)
    with pytest.raises(InputError) as info:
        model_from_hf_config(path)
    err = info.value
    assert err.field.endswith(key) and fragment in str(err)
    assert str(err).startswith(f"{path}:{err.line}: ")
    line = path.read_text().splitlines()[err.line - 1]
    # The key's own line, or its enclosing key's when the key is missing.
    assert any(f'"{part}"' in line for part in key.split("."))


QWEN2: dict[str, Any] = {
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 1000,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "sliding_window": 32,
    "use_sliding_window": True,
    "max_window_layers": 2,
}


def test_qwen2_windows_follow_max_window_layers_and_layer_types(tmp_path: Path) -> None:
    cfg = model_from_hf_config(write(tmp_path, QWEN2))
    assert [cfg.window_of_layer(i) for i in range(4)] == [0, 0, 32, 32]
    kinds = ["full_attention"] * 3 + ["sliding_attention"]
    cfg = model_from_hf_config(write(tmp_path, QWEN2 | {"layer_types": kinds}))
    assert [cfg.window_of_layer(i) for i in range(4)] == [0, 0, 0, 32]
    off = model_from_hf_config(write(tmp_path, QWEN2 | {"use_sliding_window": False}))
    assert off.attention_window == 0
    absent = {k: v for k, v in QWEN2.items() if k != "sliding_window"}
    assert model_from_hf_config(write(tmp_path, absent)).attention_window == 4096
    mixed = ["sliding_attention", "full_attention"] * 2
    with pytest.raises(InputError, match="layer_types: sliding_attention layers must all follow"):
        model_from_hf_config(write(tmp_path, QWEN2 | {"layer_types": mixed}))


def test_sliding_window_sizes_the_kv_cache() -> None:
    mistral = MODEL_PRESETS["mistral-7b"]
    full = replace(mistral, attention_window=0)
    work = Workload(32768, 1, "fp16")
    windowed = next(op for op in build_ops(mistral, "fp16") if op.kind == "attention")
    unwindowed = next(op for op in build_ops(full, "fp16") if op.kind == "attention")
    kv_per_position = windowed.kv_bytes_per_token
    saved = op_sram_bytes(unwindowed, 1, full, work) - op_sram_bytes(windowed, 1, mistral, work)
    # KV for 32768 - 4096 positions, plus that many fewer fp32 attention scores.
    assert saved == (32768 - 4096) * (kv_per_position + 4)
    short = Workload(2048, 1, "fp16")
    assert op_sram_bytes(windowed, 1, mistral, short) == op_sram_bytes(unwindowed, 1, full, short)


def test_config_round_trips_through_a_manifest() -> None:
    cfg = MODEL_PRESETS["llama-3.2-1b"]
    assert ModelConfig(**json.loads(json.dumps(cfg.to_dict()))) == cfg


# --- rope tables ---------------------------------------------------------------------------


def test_default_rope_is_unscaled_and_unchanged() -> None:
    cos, sin = rope_table(8, 10000.0, 5)
    angles = np.outer(np.arange(5), 1.0 / 10000.0 ** (np.arange(0, 8, 2) / 8))
    assert np.array_equal(cos[:, :4], np.cos(angles).astype(np.float32))
    assert np.array_equal(sin[:, 4:], np.sin(angles).astype(np.float32))


def test_linear_rope_divides_positions() -> None:
    scaled = rope_table(16, 10000.0, 64, RopeScaling("linear", 4.0))
    plain = rope_table(16, 10000.0, 64)
    assert np.allclose(scaled[0][::4][:16], plain[0][:16], atol=1e-6)
    assert not np.allclose(scaled[0][1:], plain[0][1:], atol=1e-3)


def test_llama3_rope_keeps_high_and_scales_low_frequencies() -> None:
    rope = RopeScaling("llama3", 8.0, 8192, 1.0, 4.0)
    plain = rope_inv_freq(128, 500000.0)
    scaled = rope_inv_freq(128, 500000.0, rope)
    wavelen = 2 * np.pi / plain
    high, low = wavelen < 8192 / 4, wavelen > 8192 / 1
    assert np.array_equal(scaled[high], plain[high]) and np.allclose(scaled[low], plain[low] / 8)
    medium = ~high & ~low
    assert medium.any() and np.all(scaled[medium] < plain[medium])
    assert np.all(scaled[medium] > plain[medium] / 8)


def test_dynamic_rope_is_default_within_the_original_context() -> None:
    rope = RopeScaling("dynamic", 2.0, 16)
    cos, _sin = rope_table(8, 10000.0, 40, rope)
    plain_cos, _ = rope_table(8, 10000.0, 40)
    assert np.array_equal(cos[:16], plain_cos[:16])
    # Position 30 uses the base of a 31-token sequence: theta * (2 * 31/16 - 1) ** (8/6).
    base = 10000.0 * (2.0 * 31 / 16 - 1.0) ** (8 / 6)
    want = np.cos(30 / base ** (np.arange(0, 8, 2) / 8)).astype(np.float32)
    assert np.array_equal(cos[30, :4], want)


def test_yarn_rope_scales_cos_and_sin_by_its_attention_factor() -> None:
    rope = RopeScaling("yarn", 4.0, 64, attention_factor=1.25)
    cos, sin = rope_table(16, 10000.0, 32, rope)
    assert np.allclose(cos * cos + sin * sin, 1.25**2, rtol=1e-6)
    inv = rope_inv_freq(16, 10000.0, rope)
    plain = rope_inv_freq(16, 10000.0)
    assert inv[0] == plain[0] and np.isclose(inv[-1], plain[-1] / 4)


# --- through lpuctl ------------------------------------------------------------------------

DEPLOYMENT = """apiVersion: lpu.lockstep.dev/v1alpha1
kind: LPUDeployment
metadata:
  name: golden
spec:
  model:
    config: config.json
  precision: fp16
  replicas: 1
  serving:
    maxContext: 32
    maxBatch: 1
"""


@pytest.mark.parametrize(
    ("rope", "fragment"),
    [
        (
            {"rope_type": "longrope", "rope_theta": 1e4, "factor": 2.0},
            "rope_parameters.rope_type: rope type 'longrope' is not supported; supported: "
            "default, linear, dynamic, llama3, yarn",
        ),
        (None, ""),
    ],
)
def test_lpuctl_plan_reads_the_5x_file_or_exits_2_naming_the_key(
    rope: dict[str, Any] | None, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main

    golden = Path(__file__).parent / "golden" / "fixtures" / "llama-llama3" / "config.json"
    raw = json.loads(golden.read_text())
    if rope is not None:
        raw["rope_parameters"] = rope
    (tmp_path / "config.json").write_text(json.dumps(raw, indent=2))
    (tmp_path / "deploy.yaml").write_text(DEPLOYMENT)
    code = main(["plan", "-f", str(tmp_path / "deploy.yaml"), "-o", "json"])
    out, err = capsys.readouterr()
    if rope is None:
        assert code == 0 and json.loads(out)["pipelineStages"] >= 1
    else:
        line = 1 + next(
            i for i, t in enumerate(json.dumps(raw, indent=2).splitlines()) if '"rope_type"' in t
        )
        assert code == 2 and out == "" and "Traceback" not in err
        assert f"{tmp_path / 'config.json'}:{line}: {fragment}" in err


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_round_trip_through_a_5x_config(name: str, tmp_path: Path) -> None:
    cfg = MODEL_PRESETS[name]
    written = to_hf_config(cfg)
    assert "rope_theta" not in written and written["rope_parameters"]["rope_theta"]
    assert model_from_hf_config(write(tmp_path, written), name=name) == cfg


@pytest.mark.parametrize(
    "cfg",
    [
        replace(MODEL_PRESETS["tiny-llama"], rope=RopeScaling("linear", 2.0)),
        replace(MODEL_PRESETS["tiny-llama"], rope=RopeScaling("dynamic", 4.0, 1024)),
        replace(MODEL_PRESETS["tiny-llama"], qkv_bias=True, o_bias=True),
        replace(MODEL_PRESETS["qwen2.5-0.5b"], attention_window=4096, window_from_layer=21),
        replace(MODEL_PRESETS["mixtral-8x7b"], attention_window=4096),
    ],
    ids=["linear", "dynamic", "llama-bias", "qwen2-window", "mixtral-window"],
)
def test_variants_round_trip(cfg: ModelConfig, tmp_path: Path) -> None:
    assert model_from_hf_config(write(tmp_path, to_hf_config(cfg)), name=cfg.name) == cfg


def test_yarn_round_trips(tmp_path: Path) -> None:
    raw = LLAMA_31_4X | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "mscale": 0.7,
                                          "mscale_all_dim": 1.0, "beta_fast": 16}}  # fmt: skip
    cfg = model_from_hf_config(write(tmp_path, raw), name="y")
    # mscale/mscale_all_dim: (0.1 * 0.7 * ln 4 + 1) / (0.1 * 1.0 * ln 4 + 1)
    assert cfg.rope.attention_factor == pytest.approx(
        (0.07 * np.log(4) + 1) / (0.1 * np.log(4) + 1)
    )
    assert cfg.rope.beta_fast == 16 and cfg.rope.original_max_position_embeddings == 131072
    assert model_from_hf_config(write(tmp_path, to_hf_config(cfg)), name="y") == cfg


def test_unrepresentable_flags_are_refused() -> None:
    with pytest.raises(ValueError, match="projection biases"):
        to_hf_config(replace(MODEL_PRESETS["mixtral-8x7b"], qkv_bias=True))


def test_a_nested_key_is_found_after_its_parent(tmp_path: Path) -> None:
    raw = LLAMA_31_4X | {"rope_parameters": {"rope_theta": 1e6}, "rope_scaling": None}
    path = write(tmp_path, raw)
    with pytest.raises(InputError) as info:
        model_from_hf_config(path)
    lines = path.read_text().splitlines()
    assert info.value.line is not None
    assert '"rope_theta": 1000000.0' in lines[info.value.line - 1]
