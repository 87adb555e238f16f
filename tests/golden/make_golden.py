"""Record golden outputs of tiny random models with Hugging Face transformers (not run in CI).

For every case below: build the model's config with transformers, `save_pretrained` it (so the
config.json is spelled the way that transformers version writes it), overwrite the weights with
`seeded.seeded_tensors` (regenerable without torch), load it back with `from_pretrained`
(transformers converts checkpoint names itself, e.g. Mixtral's per-expert tensors), and record,
for a few prompts, the greedy continuation and the float32 logits of every position.

Fixtures (tests/golden/fixtures/<case>/): `config.json` as transformers wrote it, and
`golden.json` with the transformers/torch versions, the seed, the checkpoint tensor names and
shapes, the parameter count, and per prompt the generated tokens and the logits (base64 of
little-endian float32, `[len(prompt) + new - 1, vocab]`). No weights are stored.

Run it in a virtualenv with torch and transformers (the `golden` extra of pyproject.toml):

    .venv/bin/pip install -e '.[golden]'
    .venv/bin/python tests/golden/make_golden.py            # every case
    .venv/bin/python tests/golden/make_golden.py mixtral    # some
    .venv/bin/python tests/golden/make_golden.py rope       # only rope_inv_freq.json
"""

from __future__ import annotations

import base64
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from golden.seeded import seeded_tensors

FIXTURES = Path(__file__).resolve().parent / "fixtures"
SEED = 8
PROMPTS = ((1, 5, 17, 42, 7), (60, 3, 3, 33, 11, 25, 8))
NEW_TOKENS = 6

_COMMON: dict[str, Any] = {
    "vocab_size": 64,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}

# case name -> (transformers config class, model class, config overrides)
CASES: dict[str, tuple[str, str, dict[str, Any]]] = {
    "llama-default": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama-llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "llama-linear": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}},
    ),
    "llama-yarn": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    # max_position_embeddings 8: the prompts (5 and 7 tokens) fit, generation goes beyond it.
    "llama-dynamic": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {
            "max_position_embeddings": 8,
            "rope_parameters": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    "llama-tied-bias": (
        "LlamaConfig",
        "LlamaForCausalLM",
        {"tie_word_embeddings": True, "attention_bias": True},
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4096}),
    # A window of 4 positions: the prompts (5 and 7 tokens) and their continuations outgrow it.
    "mistral-window": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 4}),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        {"num_local_experts": 4, "num_experts_per_tok": 2},
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
    # Qwen2 windows only the layers from max_window_layers on: layer 0 full, layer 1 windowed.
    "qwen2-window": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    ),
}

INCREMENTAL = {"llama-dynamic"}
"""Cases decoded token by token with the KV cache, the way transformers' dynamic rope matches
Lockstep's (each position rotated with the base of the sequence ending there). Other cases
recompute the whole sequence each step and take all logits from one final forward pass."""


def _encode(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype="<f4").tobytes()).decode()


def make_case(name: str) -> None:
    import torch
    import transformers
    from safetensors import safe_open
    from safetensors.numpy import save_file

    torch.set_num_threads(1)
    config_cls, model_cls, overrides = CASES[name]
    config = getattr(transformers, config_cls)(**(_COMMON | overrides))
    config._attn_implementation = "eager"
    model_type = getattr(transformers, model_cls)
    out = FIXTURES / name
    with tempfile.TemporaryDirectory() as tmp:
        model_type(config).save_pretrained(tmp)
        weights = Path(tmp) / "model.safetensors"
        with safe_open(str(weights), framework="np") as f:
            shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}  # noqa: SIM118
        save_file(seeded_tensors(shapes, SEED), str(weights), metadata={"format": "pt"})
        model = model_type.from_pretrained(tmp, dtype=torch.float32, attn_implementation="eager")
        model.eval()
        out.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(tmp) / "config.json", out / "config.json")
    prompts = []
    with torch.no_grad():
        for prompt in PROMPTS if name not in INCREMENTAL else ():
            tokens = list(prompt)
            for _ in range(NEW_TOKENS):
                ids = torch.tensor([tokens])
                logits = model(input_ids=ids, use_cache=False).logits[0, -1]
                tokens.append(int(torch.argmax(logits)))
            ids = torch.tensor([tokens[:-1]])
            logits = model(input_ids=ids, use_cache=False).logits[0].numpy()
            prompts.append(
                {
                    "prompt": list(prompt),
                    "generated": tokens[len(prompt) :],
                    "logits_shape": list(logits.shape),
                    "logits_f32_b64": _encode(logits),
                }
            )
        for prompt in PROMPTS if name in INCREMENTAL else ():
            out_ids = model(input_ids=torch.tensor([list(prompt)]), use_cache=True)
            rows, cache = [out_ids.logits[0]], out_ids.past_key_values
            tokens = [*prompt, int(torch.argmax(rows[-1][-1]))]
            for _ in range(NEW_TOKENS - 1):
                step = model(input_ids=torch.tensor([[tokens[-1]]]), cache=cache, use_cache=True)
                rows.append(step.logits[0])
                cache = step.past_key_values
                tokens.append(int(torch.argmax(rows[-1][-1])))
            logits = torch.cat(rows).numpy()
            prompts.append(
                {
                    "prompt": list(prompt),
                    "generated": tokens[len(prompt) :],
                    "logits_shape": list(logits.shape),
                    "logits_f32_b64": _encode(logits),
                }
            )
    golden = {
        "case": name,
        "decoding": "incremental" if name in INCREMENTAL else "recompute",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "architecture": model_cls,
        "seed": SEED,
        "weights": "tests/golden/seeded.py seeded_tensors(tensors, seed)",
        "tensors": {key: list(shape) for key, shape in sorted(shapes.items())},
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "prompts": prompts,
    }
    (out / "golden.json").write_text(json.dumps(golden, indent=1) + "\n")
    tokens = [p["generated"] for p in prompts]
    print(f"{name}: {golden['num_parameters']} parameters, tokens {tokens}")


ROPE_FIXTURE = FIXTURES / "rope_inv_freq.json"


def make_rope_fixture() -> None:
    """transformers' inverse frequencies and attention factor for the rope-scaled presets.

    Checks the rope formulas at real scale (head_dim 64/128, theta 5e5, factors 8 and 32), which
    the tiny models cannot: each preset is written with `placement.models.to_hf_config`, read by
    transformers' AutoConfig, and passed to transformers' own rope init function.
    """
    from dataclasses import replace

    import transformers
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from placement.models import MODEL_PRESETS, RopeScaling, to_hf_config

    llama3 = MODEL_PRESETS["llama-3-8b"]
    models = {n: c for n, c in MODEL_PRESETS.items() if c.rope.rope_type != "default"}
    models["llama-3-8b+yarn"] = replace(llama3, rope=RopeScaling("yarn", 4.0, 8192))
    models["llama-3-8b+yarn-beta"] = replace(
        llama3, rope=RopeScaling("yarn", 16.0, 4096, beta_fast=16.0, attention_factor=1.2)
    )
    models["llama-3-8b+linear"] = replace(llama3, rope=RopeScaling("linear", 4.0))
    configs = {name: to_hf_config(cfg) for name, cfg in models.items()}
    # Written by hand: the attention factor from mscale/mscale_all_dim (DeepSeek-style yarn).
    configs["llama-3-8b+yarn-mscale"] = to_hf_config(llama3) | {
        "rope_parameters": {
            "rope_type": "yarn",
            "rope_theta": 500000.0,
            "factor": 40.0,
            "original_max_position_embeddings": 4096,
            "mscale": 0.707,
            "mscale_all_dim": 1.0,
            "beta_fast": 32,
            "beta_slow": 1,
        }
    }
    entries = {}
    for name, config in configs.items():
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "config.json").write_text(json.dumps(config))
            hf = AutoConfig.from_pretrained(tmp)
        inv_freq, attention = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")
        entries[name] = {
            "config": config,
            "inv_freq_f32_b64": _encode(inv_freq.numpy()),
            "attention_factor": float(attention),
        }
    ROPE_FIXTURE.write_text(
        json.dumps({"transformers_version": transformers.__version__, "models": entries}, indent=1)
        + "\n"
    )
    print(f"rope: {', '.join(entries)}")


def main(argv: list[str]) -> int:
    if argv == ["rope"] or not argv:
        make_rope_fixture()
        if argv:
            return 0
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {', '.join(CASES)}", file=sys.stderr)
        return 2
    for name in names:
        make_case(name)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
