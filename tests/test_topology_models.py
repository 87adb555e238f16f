"""Topology presets and dicts, chip profiles, model presets and Hugging Face config import."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from placement.errors import InputError
from placement.models import (
    MODEL_PRESETS,
    build_ops,
    chunk_limits,
    chunk_units,
    kv_heads_of,
    model_from_hf_config,
    model_preset,
)
from placement.profiles import GROQ_RACK, profile_from_dict
from placement.topology import ChipState, preset_topology, topology_from_dict

PUBLISHED_PARAMS_B = {
    "llama-2-7b": 6.74,
    "llama-2-70b": 68.98,
    "llama-3-8b": 8.03,
    "llama-3-70b": 70.55,
    "llama-3.1-405b": 405.85,
    "mixtral-8x7b": 46.70,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_B))
def test_presets_match_published_parameter_counts(name: str) -> None:
    got = MODEL_PRESETS[name].parameter_count() / 1e9
    assert got == pytest.approx(PUBLISHED_PARAMS_B[name], rel=0.002)


def test_tiny_llama_is_a_few_million_parameters() -> None:
    assert 1e6 < MODEL_PRESETS["tiny-llama"].parameter_count() < 2e7


def test_ops_are_finer_than_layers() -> None:
    ops = build_ops(MODEL_PRESETS["mixtral-8x7b"], "int8")
    kinds = [op.kind for op in ops]
    assert kinds[0] == "embedding" and kinds[-2:] == ["final_norm", "lm_head"]
    assert kinds.count("expert") == 32 * 8 and kinds.count("attention") == 32
    assert ops[2].name == "layers.0.router"


def test_largest_system_preset() -> None:
    topo = preset_topology(145, "groq-rack")
    assert topo.chip_count == 10_440
    assert topo.chip_id(topo.parse_chip("rack-144/node-8/chip-7")) == "rack-144/node-8/chip-7"


def test_topology_from_dict_with_states() -> None:
    topo = topology_from_dict(
        {
            "profile": "dev",
            "racks": [{"name": "a", "nodes": 2}, {"name": "b"}],
            "chips": {"a/node-1/chip-3": "failed", "b/node-0": "cordoned"},
        },
        source="t.yaml",
    )
    counts = topo.count_states()
    assert counts[ChipState.FAILED] == 1 and counts[ChipState.CORDONED] == 8
    assert topo.nodes_per_rack == (2, 3)


@pytest.mark.parametrize(
    ("raw", "fragment"),
    [
        ({"racks": 2}, "profile: required"),
        ({"profile": "nope", "racks": 2}, "unknown chip profile"),
        ({"profile": "dev"}, "racks: required"),
        ({"profile": "dev", "racks": 0}, "racks: must be from 1"),
        ({"profile": "dev", "racks": 2, "extra": 1}, "unknown field 'extra'"),
        ({"profile": "dev", "racks": [{"name": "A"}]}, "racks[0].name"),
        ({"profile": "dev", "racks": [{"name": "a"}, {"name": "a"}]}, "duplicate rack"),
        ({"profile": "dev", "racks": 1, "chips": {"rack-0/node-9/chip-0": "failed"}}, "nodes 0..2"),
        (
            {"profile": "dev", "racks": 1, "chips": {"rack-0/node-0/chip-0": "broken"}},
            "state must be one of",
        ),
        ({"profile": "dev", "racks": 1, "chips": {"rack-7/node-0": "failed"}}, "no rack named"),
        ({"profile": {"sram_bytes": -1}, "racks": 1}, "profile.sram_bytes"),
        ({"profile": {"memory_efficiency": 2}, "racks": 1}, "at most 1.0"),
        ({"profile": {"warp_drive": 1}, "racks": 1}, "unknown profile field"),
        ({"profile": {"chips_per_node": 100_000_000}, "racks": 1}, "at most 64"),
        ({"profile": {"nodes_per_rack": 10**9}, "racks": 2}, "at most 1024"),
        ([1, 2], "must be a mapping"),
    ],
)
def test_bad_topologies_name_the_field(raw: object, fragment: str) -> None:
    with pytest.raises(InputError) as info:
        topology_from_dict(raw, source="t.yaml")
    assert fragment in str(info.value)
    assert str(info.value).startswith("t.yaml")


def test_profile_override_keeps_base() -> None:
    prof = profile_from_dict({"base": "groq-rack", "sram_bytes": 1 << 30}, source="p")
    assert prof.sram_bytes == 1 << 30 and prof.chips_per_node == GROQ_RACK.chips_per_node
    assert prof.mlp_cut_columns == 32  # groq-rack's, kept


def test_profile_mlp_cut_columns_override_and_bad_values() -> None:
    """A profile may set how finely MLPs are cut; the partitioner then cuts no finer."""
    prof = profile_from_dict({"base": "dev", "mlp_cut_columns": 64}, source="p")
    assert prof.mlp_cut_columns == 64
    assert chunk_limits(model_preset("tiny-llama"), prof.mlp_cut_columns)["mlp"] == 704 // 64
    for bad in (0, -32, 2.5, "32", 1 << 20):
        with pytest.raises(InputError) as err:
            profile_from_dict({"mlp_cut_columns": bad}, source="p")
        assert err.value.field == "profile.mlp_cut_columns"


def write_config(tmp_path: Path, **overrides: object) -> Path:
    raw: dict[str, object] = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
    }
    raw.update(overrides)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw, indent=1))
    return path


def test_hf_config_import_equals_preset(tmp_path: Path) -> None:
    cfg = model_from_hf_config(write_config(tmp_path), name="mixtral-8x7b")
    assert cfg.parameter_count() == MODEL_PRESETS["mixtral-8x7b"].parameter_count()
    assert cfg.is_moe and cfg.num_experts_per_tok == 2


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, "unsupported architecture"),
        ({"hidden_size": "big"}, "hidden_size: must be an integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers: must be between"),
        ({"num_key_value_heads": 7}, "multiple of num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "exceeds num_local_experts"),
        ({"vocab_size": None}, "vocab_size"),
    ],
)
def test_bad_hf_configs(tmp_path: Path, overrides: dict[str, object], fragment: str) -> None:
    path = write_config(tmp_path, **overrides)
    if overrides.get("vocab_size", 1) is None:
        raw = json.loads(path.read_text())
        del raw["vocab_size"]
        path.write_text(json.dumps(raw))
    with pytest.raises(InputError, match=fragment):
        model_from_hf_config(path)


def test_hf_config_syntax_error_has_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text('{\n  "vocab_size": 10,\n  oops\n}')
    with pytest.raises(InputError) as info:
        model_from_hf_config(path)
    assert info.value.line == 3 and "invalid JSON" in str(info.value)


def test_hf_config_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        model_from_hf_config(tmp_path / "nope.json")


@pytest.mark.parametrize("name", ["tiny-llama", "llama-3.1-405b", "qwen2.5-0.5b", "llama-2-7b"])
def test_attention_chunks_follow_the_kv_groups(name: str) -> None:
    """Up to one chunk per KV head, chunks are whole KV groups; beyond, every chunk lies inside
    one group, so a group is held twice only where the plan cuts it. Chunks tile the heads."""
    cfg = model_preset(name)
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    group = heads // kv
    for chunks in range(1, heads + 1):
        pieces = [chunk_units(cfg, "attention", chunks, i) for i in range(chunks)]
        assert pieces[0][0] == 0 and pieces[-1][1] == heads
        assert all(a[1] == b[0] for a, b in pairwise(pieces))
        assert all(start < end for start, end in pieces)
        if chunks <= kv:
            assert all(start % group == 0 and end % group == 0 for start, end in pieces)
        else:
            assert all(start // group == (end - 1) // group for start, end in pieces)
    assert kv_heads_of(cfg, 0, heads) == (0, kv)
    assert kv_heads_of(cfg, group - 1, group + 1) == (
        (0, 2) if group > 1 else (group - 1, group + 1)
    )
    assert kv_heads_of(cfg, 3, 3) == (0, 0)
