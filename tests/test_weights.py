"""Seeded Hugging Face checkpoints: reproducible bytes, lazy validated reading, clear errors."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from orchestrator.weights import (
    INDEX_FILE,
    SINGLE_FILE,
    SeededWeights,
    open_checkpoint,
    to_bf16_bits,
    write_checkpoint,
)
from placement.errors import InputError
from placement.models import MODEL_PRESETS, ModelConfig, model_from_hf_config
from shardformat.codec import decode_f32
from shardformat.layout import TensorSlice, checkpoint_tensor_shapes

MICRO = ModelConfig("micro-llama", 256, 64, 96, 2, 4, 2, max_position_embeddings=128)
MICRO_MOE = ModelConfig(
    "micro-mixtral",
    128,
    32,
    48,
    2,
    4,
    2,
    num_local_experts=3,
    num_experts_per_tok=2,
    tie_word_embeddings=True,
)

# sha256 of model.safetensors of MICRO, seed 0, fp16. If this changes, seeded checkpoints are no
# longer the same bytes as before (numpy's generator or the writer changed): bump
# GENERATOR_VERSION and this digest together.
GOLDEN_MICRO_FP16 = "4842233021454fe4c7fd355418e54d4408f7940c2196b23ba717018f6c880cda"


def _digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = write_checkpoint(MODEL_PRESETS["tiny-llama"], tmp_path / "a", seed=7)
    write_checkpoint(MODEL_PRESETS["tiny-llama"], tmp_path / "b", seed=7)
    assert [p.name for p in a.files] == [SINGLE_FILE, "config.json"]
    assert _digests(tmp_path / "a") == _digests(tmp_path / "b")
    write_checkpoint(MODEL_PRESETS["tiny-llama"], tmp_path / "c", seed=8)
    assert _digests(tmp_path / "c")[SINGLE_FILE] != _digests(tmp_path / "a")[SINGLE_FILE]


def test_golden_digest(tmp_path: Path) -> None:
    """Pins the bytes across machines and releases (stream-compatible numpy generator)."""
    write_checkpoint(MICRO, tmp_path, seed=0)
    digest = _digests(tmp_path)[SINGLE_FILE]
    assert digest == GOLDEN_MICRO_FP16


def test_layout_matches_hugging_face(tmp_path: Path) -> None:
    write_checkpoint(MICRO_MOE, tmp_path, seed=1, precision="fp16")
    with safe_open(str(tmp_path / SINGLE_FILE), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        names = set(f.keys())
        assert names == set(checkpoint_tensor_shapes(MICRO_MOE))
        assert "model.layers.1.block_sparse_moe.experts.2.w2.weight" in names
        assert "lm_head.weight" not in names  # tied embeddings
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [16, 32]
        assert f.get_slice("model.layers.0.block_sparse_moe.gate.weight").get_dtype() == "F16"
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["torch_dtype"] == "float16"
    loaded = model_from_hf_config(tmp_path / "config.json", name=MICRO_MOE.name)
    assert loaded == MICRO_MOE


def test_sharded_checkpoint_reads_like_single_file(tmp_path: Path) -> None:
    write_checkpoint(MICRO, tmp_path / "one", seed=3)
    files = write_checkpoint(MICRO, tmp_path / "many", seed=3, max_file_bytes=20_000)
    shards = [p for p in files.files if p.name.startswith("model-")]
    assert len(shards) > 2 and shards[0].name.endswith(f"-of-{len(shards):05d}.safetensors")
    index = json.loads((tmp_path / "many" / INDEX_FILE).read_text())
    assert set(index["weight_map"]) == set(checkpoint_tensor_shapes(MICRO))
    with open_checkpoint(tmp_path / "one") as one, open_checkpoint(tmp_path / "many") as many:
        assert one.cfg.name == "one"  # named after the directory when no config is given
        assert many.cfg == replace(MICRO, name="many")
        for name in checkpoint_tensor_shapes(MICRO):
            assert np.array_equal(one[name], many[name])


def test_seeded_weights_equal_checkpoint(tmp_path: Path) -> None:
    write_checkpoint(MICRO, tmp_path, seed=5, precision="bf16")
    seeded = SeededWeights(MICRO, 5, "BF16")
    with open_checkpoint(tmp_path, MICRO) as ckpt:
        assert ckpt.dtype_of("model.norm.weight") == "BF16"
        for name in ckpt:
            assert ckpt[name].dtype == np.float32
            assert np.array_equal(ckpt[name], seeded[name])
        cut = TensorSlice("x", "model.layers.1.mlp.down_proj.weight", 1, 10, 40)
        assert np.array_equal(ckpt.raw_slice(cut), seeded.raw_slice(cut))
        assert ckpt.raw_slice(cut).shape == (64, 30)


def test_weights_are_well_conditioned() -> None:
    seeded = SeededWeights(MODEL_PRESETS["tiny-llama"], 0, "F32")
    q = seeded["model.layers.0.self_attn.q_proj.weight"]
    assert abs(float(q.std()) * np.sqrt(256) - 1) < 0.05
    norm = seeded["model.layers.3.input_layernorm.weight"]
    assert 0.9 < float(norm.mean()) < 1.1
    assert np.isfinite(seeded["lm_head.weight"]).all()


def test_bf16_rounds_to_nearest_even() -> None:
    values = np.array([1.0, 1.00390625, 1.01171875, -2.5, 3.0e-3], np.float32)
    bits = to_bf16_bits(values)
    back = decode_f32(bits, "BF16")
    assert back[0] == 1.0 and back[1] == 1.0  # halfway: to even
    assert back[2] == 1.015625  # halfway: to even (up)
    assert back[3] == -2.5
    assert abs(back[4] - 3.0e-3) < 2e-5


def _rewrite_without(
    path: Path, drop: str | None = None, replace: tuple[str, np.ndarray] | None = None
) -> None:
    with safe_open(str(path), framework="numpy") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}  # noqa: SIM118
    if replace:
        tensors[replace[0]] = replace[1]
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    write_checkpoint(MICRO, tmp_path, seed=0)
    _rewrite_without(tmp_path / SINGLE_FILE, drop="model.layers.1.mlp.up_proj.weight")
    with pytest.raises(InputError) as err:
        open_checkpoint(tmp_path, MICRO)
    message = str(err.value)
    assert "model.safetensors" in message and "model.layers.1.mlp.up_proj.weight" in message
    assert "missing" in message and "[96, 64]" in message


def test_wrong_shape_names_file_and_tensor(tmp_path: Path) -> None:
    write_checkpoint(MICRO, tmp_path, seed=0, max_file_bytes=20_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    name = "model.layers.0.self_attn.o_proj.weight"
    target = tmp_path / index["weight_map"][name]
    _rewrite_without(target, replace=(name, np.zeros((64, 60), np.float16)))
    with pytest.raises(InputError) as err:
        open_checkpoint(tmp_path)
    message = str(err.value)
    assert target.name in message and name in message
    assert "[64, 60]" in message and "[64, 64]" in message


def test_unexpected_tensor_and_config_mismatch(tmp_path: Path) -> None:
    write_checkpoint(MICRO, tmp_path, seed=0)
    three_layers = ModelConfig("micro-llama", 256, 64, 96, 3, 4, 2, max_position_embeddings=128)
    with pytest.raises(InputError, match=r"config\.json: num_hidden_layers: is 2"):
        open_checkpoint(tmp_path, three_layers)
    (tmp_path / "config.json").unlink()
    with pytest.raises(InputError, match=r"model\.layers\.2\..*missing"):
        open_checkpoint(tmp_path, three_layers)
    one_layer = ModelConfig("micro-llama", 256, 64, 96, 1, 4, 2, max_position_embeddings=128)
    with pytest.raises(InputError, match=r"model\.layers\.1\..*unexpected tensor"):
        open_checkpoint(tmp_path, one_layer)


def test_unreadable_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no model\.safetensors"):
        open_checkpoint(tmp_path, MICRO)
    (tmp_path / SINGLE_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(InputError, match=r"model\.safetensors: not a readable safetensors file"):
        open_checkpoint(tmp_path, MICRO)
    (tmp_path / SINGLE_FILE).unlink()
    (tmp_path / INDEX_FILE).write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(InputError, match=r"gone\.safetensors: weight file is missing"):
        open_checkpoint(tmp_path, MICRO)


def test_int8_has_no_checkpoint_dtype(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="int8"):
        write_checkpoint(MICRO, tmp_path, seed=0, precision="int8")
    with pytest.raises(InputError, match="seed"):
        SeededWeights(MICRO, -1)
