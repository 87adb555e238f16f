"""Model architectures and the op list the partitioner cuts into pipeline stages.

A model is described by the numbers of a Hugging Face `config.json` (Llama, Mistral, Mixtral,
Qwen2, Qwen3; transformers 4.x or 5.x spelling). `model_from_hf_config` reads every key that
changes the computation or refuses it, naming file, line, key, value and what is supported;
a key the file leaves out takes the default transformers 5.x gives that architecture. From a
`ModelConfig`, `build_ops` derives an ordered list of ops finer than layers (embedding, per
layer attention and MLP — or router plus one op per expert —, final norm, LM head), each with
its parameter bytes at a precision, KV-cache bytes per token, FLOPs per token and the
activation bytes it hands to the next op. Presets carry the published configs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NamedTuple

from placement.errors import InputError

PRECISION_BYTES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
"""Bytes per weight element. The KV cache is stored at the same width as the weights (int8/fp8
deployments keep a quantized cache); norm weights and activations stay 16-bit."""

ACTIVATION_BYTES = 2
NORM_BYTES = 2
SMALL_BYTES = 2
"""Norm weights, biases and the MoE router stay 16-bit at every precision (a shard stores them
F16 at int8/fp8: `shardformat.precision`)."""
SCALE_BYTES = 4
"""An int8/fp8 matrix holds one float32 scale per output row."""
QUANTIZED_PRECISIONS = ("int8", "fp8")


ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
"""Rotary-embedding variants the planner accepts and `agents.kernels.rope_table` computes."""


class RopeScaling(NamedTuple):
    """How rotary frequencies are scaled, with every default already resolved.

    The fields are those of transformers' `rope_parameters` (4.x: `rope_scaling`), resolved the
    way transformers 5.x resolves them (`modeling_rope_utils`), so the kernel needs no config:

    * `linear`: every inverse frequency divided by `factor`.
    * `dynamic` (NTK): for a sequence of length L > `original_max_position_embeddings` the
      base becomes `theta * (factor * L / orig - (factor - 1)) ** (d / (d - 2))`.
    * `llama3`: Llama-3.1 smoothing between `low_freq_factor` and `high_freq_factor`.
    * `yarn`: ramp between interpolated and extrapolated frequencies over the dimensions
      `beta_fast`…`beta_slow` rotate through, cos/sin multiplied by `attention_factor`
      (resolved from `mscale`/`mscale_all_dim` or `0.1 ln(factor) + 1` when not given).
    """

    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float = 1.0
    truncate: bool = True

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | Sequence[Any]) -> RopeScaling:
        """From `_asdict()` (a shard manifest) or the list JSON makes of the tuple."""
        if isinstance(raw, Mapping):
            return cls(**{k: raw[k] for k in cls._fields if k in raw})
        return cls(*raw)


NO_ROPE_SCALING = RopeScaling()


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers that size and define a decoder-only transformer.

    Llama, Mistral, Mixtral, Qwen2 and Qwen3 differ only in the flags below: q/k/v (and o)
    projection biases, RMSNorm of q and k per head, a sliding attention window, experts.
    Field names that are not Hugging Face keys (`rope`, `attention_window`, …) are deliberately
    not spelled like one: their meaning is the resolved one, not the file's.
    """

    name: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int = 0
    num_local_experts: int = 0
    num_experts_per_tok: int = 0
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    rope: RopeScaling = NO_ROPE_SCALING
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2; Llama attention_bias)
    o_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias)
    qk_norm: bool = False  # RMSNorm over head_dim of q and k before rotation (Qwen3)
    attention_window: int = 0  # attend to at most this many positions (0: full attention)
    window_from_layer: int = 0  # layers before this one attend fully (Qwen2)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if not isinstance(self.rope, RopeScaling):  # from JSON: a manifest or `to_dict()`
            object.__setattr__(self, "rope", RopeScaling.from_json(self.rope))

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def window_of_layer(self, layer: int) -> int:
        """KV positions layer `layer` keeps (0: the whole context)."""
        if self.attention_window and layer >= self.window_from_layer:
            return self.attention_window
        return 0

    def parameter_count(self) -> int:
        """Total parameters (matrices, biases and norm weights), as `build_ops` sizes them.

        Tied embeddings are counted once, as the published figures do.
        """
        return sum(op.params + op.norm_params for op in _op_shapes(self))

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["rope"] = self.rope._asdict()
        return out


_LLAMA3_ROPE = RopeScaling("llama3", 8.0, 8192, 1.0, 4.0)
_LLAMA32_ROPE = RopeScaling("llama3", 32.0, 8192, 1.0, 4.0)

MODEL_PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        # Llama 2 (meta-llama/Llama-2-*-hf config.json)
        ModelConfig("llama-2-7b", 32000, 4096, 11008, 32, 32, 32, max_position_embeddings=4096),
        ModelConfig("llama-2-13b", 32000, 5120, 13824, 40, 40, 40, max_position_embeddings=4096),
        ModelConfig("llama-2-70b", 32000, 8192, 28672, 80, 64, 8, max_position_embeddings=4096),
        # Llama 3 / 3.1 / 3.2 (meta-llama/Meta-Llama-3-*, Llama-3.1-*, Llama-3.2-*)
        ModelConfig(
            "llama-3-8b", 128256, 4096, 14336, 32, 32, 8,
            max_position_embeddings=8192, rope_theta=500000.0,
        ),
        ModelConfig(
            "llama-3-70b", 128256, 8192, 28672, 80, 64, 8,
            max_position_embeddings=8192, rope_theta=500000.0,
        ),
        ModelConfig(
            "llama-3.1-8b", 128256, 4096, 14336, 32, 32, 8,
            max_position_embeddings=131072, rope_theta=500000.0, rope=_LLAMA3_ROPE,
        ),
        ModelConfig(
            "llama-3.1-70b", 128256, 8192, 28672, 80, 64, 8,
            max_position_embeddings=131072, rope_theta=500000.0, rope=_LLAMA3_ROPE,
        ),
        ModelConfig(
            "llama-3.1-405b", 128256, 16384, 53248, 126, 128, 8,
            max_position_embeddings=131072, rope_theta=500000.0, rope=_LLAMA3_ROPE,
        ),
        ModelConfig(
            "llama-3.2-1b", 128256, 2048, 8192, 16, 32, 8, head_dim=64,
            tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0,
            rope=_LLAMA32_ROPE,
        ),
        ModelConfig(
            "llama-3.2-3b", 128256, 3072, 8192, 28, 24, 8, head_dim=128,
            tie_word_embeddings=True, max_position_embeddings=131072, rope_theta=500000.0,
            rope=_LLAMA32_ROPE,
        ),
        # Mistral (mistralai/Mistral-7B-v0.1: a 4096-token sliding window; v0.3: none)
        ModelConfig(
            "mistral-7b", 32000, 4096, 14336, 32, 32, 8,
            max_position_embeddings=32768, attention_window=4096,
        ),
        ModelConfig(
            "mistral-7b-v0.3", 32768, 4096, 14336, 32, 32, 8,
            max_position_embeddings=32768, rope_theta=1000000.0,
        ),
        ModelConfig(
            "mixtral-8x7b", 32000, 4096, 14336, 32, 32, 8,
            num_local_experts=8, num_experts_per_tok=2,
            max_position_embeddings=32768, rope_theta=1000000.0,
        ),
        # Qwen2 / Qwen2.5 (q/k/v biases; Qwen/Qwen2-7B, Qwen/Qwen2.5-*)
        ModelConfig(
            "qwen2-7b", 152064, 3584, 18944, 28, 28, 4,
            max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6,
            qkv_bias=True,
        ),
        ModelConfig(
            "qwen2.5-0.5b", 151936, 896, 4864, 24, 14, 2, tie_word_embeddings=True,
            max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
            qkv_bias=True,
        ),
        ModelConfig(
            "qwen2.5-7b", 152064, 3584, 18944, 28, 28, 4,
            max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
            qkv_bias=True,
        ),
        # Qwen3 dense (q/k RMSNorm; Qwen/Qwen3-*)
        ModelConfig(
            "qwen3-0.6b", 151936, 1024, 3072, 28, 16, 8, head_dim=128, tie_word_embeddings=True,
            max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
            qk_norm=True,
        ),
        ModelConfig(
            "qwen3-8b", 151936, 4096, 12288, 36, 32, 8, head_dim=128,
            max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
            qk_norm=True,
        ),
        # A few million parameters: small enough to execute in numpy, large enough that the
        # `dev` chip profile needs a dozen chips for it.
        ModelConfig(
            "tiny-llama", 4096, 256, 704, 8, 8, 4,
            max_position_embeddings=1024, rms_norm_eps=1e-6,
        ),
    )
}  # fmt: skip


def preset_names() -> list[str]:
    return sorted(MODEL_PRESETS)


def model_preset(name: str) -> ModelConfig:
    try:
        return MODEL_PRESETS[name]
    except KeyError:
        raise InputError(
            f"unknown model preset {name!r}; known presets: {', '.join(preset_names())}",
            field="spec.model.preset",
        ) from None


# --- Hugging Face config.json --------------------------------------------------------------


@dataclass(frozen=True)
class _Arch:
    """What transformers 5.x assumes for a key an architecture's config.json leaves out."""

    model_type: str
    rope_theta: float
    rms_norm_eps: float
    max_position_embeddings: int
    sliding_window: int | None  # default when the key is absent (Qwen: with use_sliding_window)
    qkv_bias: bool  # always on (Qwen2) — otherwise attention_bias decides
    qk_norm: bool
    has_attention_bias: bool  # reads `attention_bias` (q, k, v and o biases)
    qwen_windows: bool  # `use_sliding_window` / `max_window_layers` / `layer_types`
    moe: bool


_ARCHITECTURES: dict[str, _Arch] = {
    "LlamaForCausalLM": _Arch("llama", 1e4, 1e-6, 2048, None, False, False, True, False, False),
    "MistralForCausalLM": _Arch(
        "mistral", 1e4, 1e-6, 131072, 4096, False, False, False, False, False
    ),
    "MixtralForCausalLM": _Arch(
        "mixtral", 1e6, 1e-5, 131072, None, False, False, False, False, True
    ),
    "Qwen2ForCausalLM": _Arch("qwen2", 1e4, 1e-6, 32768, 4096, True, False, False, True, False),
    "Qwen3ForCausalLM": _Arch("qwen3", 1e4, 1e-6, 32768, 4096, False, True, True, True, False),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)
_BY_MODEL_TYPE = {a.model_type: name for name, a in _ARCHITECTURES.items()}
_SUPPORTED_ACTIVATIONS = ("silu", "swish")  # the same function in transformers' ACT2FN
_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_MAX_CONFIG_BYTES = 1 << 20


def model_from_hf_config(path: str | Path, name: str | None = None) -> ModelConfig:
    """Read a Hugging Face `config.json` of a supported architecture (transformers 4.x or 5.x).

    Raises `InputError` naming the file, the key's line and the key for anything missing,
    mistyped or unsupported.
    """
    source = str(path)
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_CONFIG_BYTES:
            raise InputError("config file is larger than 1 MiB", source=source)
        text = p.read_text(encoding="utf-8")
        raw = json.loads(text)
    except FileNotFoundError:
        raise InputError("model config file not found", source=source) from None
    except IsADirectoryError:
        raise InputError("model config path is a directory, not a file", source=source) from None
    except UnicodeDecodeError:
        raise InputError("model config is not UTF-8 text", source=source) from None
    except json.JSONDecodeError as exc:
        raise InputError(f"invalid JSON: {exc.msg}", source=source, line=exc.lineno) from None
    except OSError as exc:
        raise InputError(f"cannot read model config: {exc.strerror}", source=source) from None
    if not isinstance(raw, dict):
        raise InputError("a model config must be a JSON object", source=source)
    return model_from_hf_dict(raw, source=source, name=name or p.parent.name or p.stem, text=text)


class _Reader:
    """Typed access to a config dict; every error names the file, the key and its line."""

    def __init__(self, raw: Mapping[str, Any], source: str, text: str | None) -> None:
        self.raw = raw
        self.source = source
        self.lines = text.splitlines() if text is not None else []

    def error(self, key: str, message: str) -> InputError:
        """The line is that of the key (a nested key searched after its parent's line), or of
        its enclosing key when the key is missing."""
        line, start = None, 0
        for part in key.split("."):
            needle = re.compile(r'"' + re.escape(part) + r'"\s*:')
            found = next(
                (i for i in range(start, len(self.lines)) if needle.search(self.lines[i])), None
            )
            if found is None:
                break
            line, start = found + 1, found + 1
        return InputError(message, source=self.source, field=key, line=line)

    def positive_int(self, key: str, value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be an integer, got {value!r}")
        if not 1 <= value <= _MAX_DIMENSION:
            raise self.error(key, f"must be between 1 and {_MAX_DIMENSION}, got {value}")
        return value

    def positive_float(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(key, f"must be a number, got {value!r}")
        number = float(value)
        if not 0.0 < number < 1e12:
            raise self.error(key, f"must be a positive number, got {value!r}")
        return number

    def boolean(self, key: str, value: Any) -> bool:
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value


def _architecture(reader: _Reader) -> tuple[str, _Arch]:
    raw = reader.raw
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    archs = raw.get("architectures")
    model_type = raw.get("model_type")
    if archs is not None:
        if not isinstance(archs, list) or len(archs) != 1 or not isinstance(archs[0], str):
            raise reader.error(
                "architectures", f"must be a list of one architecture name, got {archs!r}"
            )
        name = archs[0]
        if name not in _ARCHITECTURES:
            raise reader.error(
                "architectures", f"unsupported architecture {name!r}; supported: {supported}"
            )
        arch = _ARCHITECTURES[name]
        if model_type is not None and model_type != arch.model_type:
            raise reader.error(
                "model_type",
                f"{model_type!r} does not match architecture {name} "
                f"(model_type {arch.model_type!r})",
            )
        return name, arch
    if model_type not in _BY_MODEL_TYPE:
        raise reader.error(
            "model_type",
            f"unsupported model_type {model_type!r} and no architectures key; supported "
            f"model types: {', '.join(_BY_MODEL_TYPE)} (architectures {supported})",
        )
    name = _BY_MODEL_TYPE[model_type]
    return name, _ARCHITECTURES[name]


def model_from_hf_dict(
    raw: dict[str, Any], *, source: str, name: str, text: str | None = None
) -> ModelConfig:
    """Build a `ModelConfig` from a Hugging Face config dict (`text`: the file, for lines).

    Every key that changes the computation is either honoured or refused; a key the file
    leaves out takes the default transformers 5.x gives that architecture.
    """
    reader = _Reader(raw, source, text)
    _, arch = _architecture(reader)
    for key in _REQUIRED_HF_KEYS:
        if raw.get(key) is None:
            raise reader.error(key, "required key is missing")
    ints = {}
    for key in (
        *_REQUIRED_HF_KEYS,
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
    ):
        if raw.get(key) is not None:
            ints[key] = reader.positive_int(key, raw[key])
    heads = ints["num_attention_heads"]
    kv_heads = ints.get("num_key_value_heads", heads)
    if heads % kv_heads:
        raise reader.error(
            "num_key_value_heads",
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})",
        )
    head_dim = ints.get("head_dim", 0)
    if not head_dim and ints["hidden_size"] % heads:
        raise reader.error(
            "hidden_size",
            f"hidden_size ({ints['hidden_size']}) is not a multiple of num_attention_heads "
            f"({heads}) and no head_dim is given",
        )
    if head_dim % 2 or (not head_dim and (ints["hidden_size"] // heads) % 2):
        raise reader.error("head_dim", "rotary embeddings need an even head_dim")
    act = raw.get("hidden_act", "silu")
    if act not in _SUPPORTED_ACTIVATIONS:
        raise reader.error(
            "hidden_act",
            f"activation {act!r} is not supported; supported: {', '.join(_SUPPORTED_ACTIVATIONS)}",
        )
    if raw.get("mlp_bias") not in (None, False):
        raise reader.error(
            "mlp_bias", f"{raw['mlp_bias']!r} is not supported; supported: false (no MLP biases)"
        )
    experts, top_k = _experts(reader, arch)
    max_pos = ints.get("max_position_embeddings", arch.max_position_embeddings)
    eps = raw.get("rms_norm_eps")
    attention_bias = False
    if arch.has_attention_bias and raw.get("attention_bias") is not None:
        attention_bias = reader.boolean("attention_bias", raw["attention_bias"])
    tie = raw.get("tie_word_embeddings")
    theta, rope = _rope(reader, arch, max_pos)
    window, window_from = _sliding_window(reader, arch, ints["num_hidden_layers"])
    return ModelConfig(
        name=name,
        vocab_size=ints["vocab_size"],
        hidden_size=ints["hidden_size"],
        intermediate_size=ints["intermediate_size"],
        num_hidden_layers=ints["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        tie_word_embeddings=False if tie is None else reader.boolean("tie_word_embeddings", tie),
        max_position_embeddings=max_pos,
        rope_theta=theta,
        rms_norm_eps=arch.rms_norm_eps
        if eps is None
        else reader.positive_float("rms_norm_eps", eps),
        rope=rope,
        qkv_bias=arch.qkv_bias or attention_bias,
        o_bias=attention_bias,
        qk_norm=arch.qk_norm,
        attention_window=window,
        window_from_layer=window_from,
    )


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg` as a transformers 5.x `config.json` dict (`rope_parameters` spelling).

    The inverse of `model_from_hf_dict`: reading the result back gives `cfg` again. The
    architecture is the one whose fixed features match the flags (Qwen3: q/k norm; Qwen2: q/k/v
    biases without an o bias, or a window from a later layer on; Mixtral: experts; Mistral: a
    window on every layer; Llama otherwise). Raises `ValueError` for a combination no supported
    architecture has.
    """
    if cfg.is_moe:
        name = "MixtralForCausalLM"
    elif cfg.qk_norm:
        name = "Qwen3ForCausalLM"
    elif (cfg.qkv_bias and not cfg.o_bias) or cfg.window_from_layer:
        name = "Qwen2ForCausalLM"
    elif cfg.attention_window:
        name = "MistralForCausalLM"
    else:
        name = "LlamaForCausalLM"
    arch = _ARCHITECTURES[name]
    biased = cfg.qkv_bias or cfg.o_bias
    if (biased and not (arch.has_attention_bias or arch.qkv_bias)) or (
        arch.has_attention_bias and cfg.qkv_bias != cfg.o_bias
    ):
        raise ValueError(f"{cfg.name}: no supported architecture has these projection biases")
    if cfg.qk_norm and cfg.window_from_layer:
        raise ValueError(f"{cfg.name}: Qwen3 windows are not written by this function")
    out: dict[str, Any] = {
        "architectures": [name],
        "model_type": arch.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_parameters": _rope_parameters(cfg),
    }
    if arch.has_attention_bias:
        out["attention_bias"] = cfg.o_bias
    if arch.moe:
        out["num_local_experts"] = cfg.num_local_experts
        out["num_experts_per_tok"] = cfg.num_experts_per_tok
    if arch.qwen_windows:
        out["use_sliding_window"] = bool(cfg.attention_window)
        out["sliding_window"] = cfg.attention_window or None
        out["max_window_layers"] = cfg.window_from_layer
    elif arch.model_type != "llama":
        out["sliding_window"] = cfg.attention_window or None
    return out


def _rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    rope = cfg.rope
    out: dict[str, Any] = {"rope_theta": cfg.rope_theta, "rope_type": rope.rope_type}
    if rope.rope_type in ("linear", "dynamic", "llama3", "yarn"):
        out["factor"] = rope.factor
    if rope.rope_type in ("llama3", "yarn"):
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.rope_type == "llama3":
        out["low_freq_factor"] = rope.low_freq_factor
        out["high_freq_factor"] = rope.high_freq_factor
    if rope.rope_type == "yarn":
        out |= {
            "beta_fast": rope.beta_fast,
            "beta_slow": rope.beta_slow,
            "attention_factor": rope.attention_factor,
            "truncate": rope.truncate,
        }
    return out


def _experts(reader: _Reader, arch: _Arch) -> tuple[int, int]:
    """Mixtral routing: softmax over all experts, top-k, weights renormalized to sum to one.

    `router_jitter_noise` only perturbs training (transformers applies it when
    `self.training`), `output_router_logits`/`router_aux_loss_coef` only add a loss: none
    changes inference, so any value is accepted.
    """
    raw = reader.raw
    if not arch.moe:
        for key in ("num_local_experts", "num_experts_per_tok"):
            if raw.get(key) not in (None, 0):
                raise reader.error(
                    key, f"{raw[key]!r}: experts are only supported with MixtralForCausalLM"
                )
        return 0, 0
    experts = reader.positive_int("num_local_experts", raw.get("num_local_experts", 8))
    top_k = reader.positive_int("num_experts_per_tok", raw.get("num_experts_per_tok", 2))
    if top_k > experts:
        raise reader.error(
            "num_experts_per_tok",
            f"num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})",
        )
    return experts, top_k


def _rope(reader: _Reader, arch: _Arch, max_pos: int) -> tuple[float, RopeScaling]:
    """rope_theta and scaling from either spelling.

    transformers 4.x writes `rope_theta` at the top level and scaling in `rope_scaling`; 5.x
    writes one `rope_parameters` dict holding `rope_theta` and `rope_type`. As in transformers,
    a non-empty `rope_scaling` takes precedence over `rope_parameters`. A theta given both at the
    top level and in the dict must agree: the two versions would disagree on which one counts.
    """
    raw = reader.raw
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(key) or {}
    if not isinstance(params, dict):
        raise reader.error(key, f"must be an object, got {params!r}")
    if any(isinstance(v, dict) for v in params.values()):
        raise reader.error(
            key, "per-layer-type rope parameters are not supported; supported: one flat object"
        )
    top_theta = raw.get("rope_theta")
    theta = arch.rope_theta
    if top_theta is not None:
        theta = reader.positive_float("rope_theta", top_theta)
    if params.get("rope_theta") is not None:
        inner = reader.positive_float(f"{key}.rope_theta", params["rope_theta"])
        if top_theta is not None and inner != theta:
            raise reader.error(
                f"{key}.rope_theta",
                f"{inner} disagrees with the top-level rope_theta {theta}; give one value",
            )
        theta = inner
    for where, value in (
        ("partial_rotary_factor", raw.get("partial_rotary_factor")),
        (f"{key}.partial_rotary_factor", params.get("partial_rotary_factor")),
    ):
        if value is not None and value != 1.0:
            raise reader.error(where, f"{value!r} is not supported; supported: 1.0 (full rotation)")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise reader.error(
            f"{key}.rope_type",
            f"rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}",
        )
    if rope_type == "default":
        return theta, RopeScaling()

    def number(field: str, default: float | None = None) -> float:
        value = params.get(field)
        if value is None:
            if default is None:
                raise reader.error(f"{key}.{field}", f"required for rope type {rope_type!r}")
            return default
        return reader.positive_float(f"{key}.{field}", value)

    orig_value = params.get("original_max_position_embeddings")
    if orig_value is None:
        orig_value = raw.get("original_max_position_embeddings")
    original = (
        max_pos
        if orig_value is None
        else reader.positive_int(f"{key}.original_max_position_embeddings", orig_value)
    )
    if rope_type in ("linear", "dynamic"):
        # Dynamic NTK scales from max_position_embeddings, as transformers does; linear scaling
        # uses no length at all.
        return theta, RopeScaling(
            rope_type, number("factor"), max_pos if rope_type == "dynamic" else 0
        )
    if rope_type == "llama3":
        low, high = number("low_freq_factor"), number("high_freq_factor")
        if high <= low:
            raise reader.error(
                f"{key}.high_freq_factor",
                f"high_freq_factor ({high}) must exceed low_freq_factor ({low})",
            )
        return theta, RopeScaling("llama3", number("factor"), original, low, high)
    factor = number("factor", max_pos / original)
    attention = params.get("attention_factor")
    if attention is None:
        mscale = params.get("mscale")
        mscale_all = params.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = _yarn_mscale(
                factor, reader.positive_float(f"{key}.mscale", mscale)
            ) / _yarn_mscale(factor, reader.positive_float(f"{key}.mscale_all_dim", mscale_all))
        else:
            attention_factor = _yarn_mscale(factor)
    else:
        attention_factor = reader.positive_float(f"{key}.attention_factor", attention)
    truncate = params.get("truncate", True)
    return theta, RopeScaling(
        "yarn",
        factor,
        original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        attention_factor=attention_factor,
        truncate=reader.boolean(f"{key}.truncate", truncate),
    )


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _sliding_window(reader: _Reader, arch: _Arch, layers: int) -> tuple[int, int]:
    """(window, first windowed layer), or (0, 0) for full attention everywhere.

    Mistral/Mixtral window every layer when `sliding_window` is set (Mistral's default is 4096
    when the key is absent). Qwen2/Qwen3 window only with `use_sliding_window`, and only the
    layers `layer_types` marks `sliding_attention` (by default those from `max_window_layers`
    on); windowed layers must be a suffix of the stack.
    """
    raw = reader.raw
    if arch.model_type == "llama":
        return 0, 0
    value = raw.get("sliding_window", arch.sliding_window) if not arch.qwen_windows else None
    if arch.qwen_windows:
        use = raw.get("use_sliding_window")
        if use is not None and reader.boolean("use_sliding_window", use):
            value = raw.get("sliding_window", arch.sliding_window)
    window = 0 if value is None else reader.positive_int("sliding_window", value)
    if not arch.qwen_windows or not window:
        return window, 0
    kinds = raw.get("layer_types")
    if kinds is None:
        first = raw.get("max_window_layers", 28)
        first = reader.positive_int("max_window_layers", first) if first else 0
        return (window, first) if first < layers else (0, 0)
    allowed = ("full_attention", "sliding_attention")
    if not isinstance(kinds, list) or len(kinds) != layers or any(k not in allowed for k in kinds):
        raise reader.error(
            "layer_types",
            f"must list one of {', '.join(allowed)} for each of the {layers} layers",
        )
    first = kinds.index("sliding_attention") if "sliding_attention" in kinds else layers
    if any(k != "sliding_attention" for k in kinds[first:]):
        raise reader.error(
            "layer_types",
            "sliding_attention layers must all follow the full_attention ones; supported: "
            "full attention up to a layer, a sliding window from it on",
        )
    return (window, first) if first < layers else (0, 0)


_MAX_DIMENSION = 1 << 24


# --- ops -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpShape:
    """One op before sizing at a precision: parameter counts and per-token work."""

    name: str
    kind: str  # embedding | attention | mlp | router | expert | final_norm | lm_head
    layer: int
    params: int  # matrix parameters, stored at the deployment precision
    norm_params: int  # norm weights, kept 16-bit
    kv_elems_per_token: int  # KV-cache elements per token of context
    flops_per_token: int
    width: int  # the dimension the op is split along for chunks and tensor parallelism
    context_flops_per_position: int = 0  # attention scores + weighted sum, per cached token
    kv_window: int = 0  # a sliding window caps the cached positions (0: the whole context)
    # What a shard holds beyond `params` matrices at the precision (see `build_ops`):
    split_biases: int = 0  # 16-bit biases cut with the op's rows (q/k/v)
    replicated_small: int = 0  # 16-bit params every chunk and TP rank holds (o bias, router)
    split_rows: int = 0  # output rows cut with the op (one int8/fp8 scale each)
    replicated_rows: int = 0  # output rows every piece holds whole (row-parallel o/down/w2)
    shared_params: int = 0  # tied LM head: the embedding again, held by the LM head's chips


@dataclass(frozen=True)
class Op:
    """One op sized at a precision: the unit the partitioner places.

    The partitioner may cut a large op into chunks along its split dimension (`split_width`:
    query heads for attention, columns for MLP and experts, vocabulary rows for embedding and
    LM head) so that stage boundaries can fall inside it. An attention chunk holds the K/V
    projections (`kv_param_bytes` for all KV heads) and KV cache of every KV head its query
    heads read: a KV group cut between two chunks is held by both (`chunk_units`).
    """

    name: str
    kind: str
    layer: int
    param_bytes: int
    kv_bytes_per_token: int
    flops_per_token: int
    activation_bytes_per_token: int
    context_flops_per_position: int = 0
    replicated_bytes: int = 0  # norms, o bias, router, row scales: every rank and chunk holds
    kv_window: int = 0  # sliding-window attention caches at most this many positions (0: all)
    kv_param_bytes: int = 0  # k/v matrices, biases and row scales (part of param_bytes)

    def cached_positions(self, max_context: int) -> int:
        """Positions of KV cache this op keeps per sequence at `max_context`."""
        return min(max_context, self.kv_window) if self.kv_window else max_context


def _op_shapes(cfg: ModelConfig) -> list[OpShape]:
    h = cfg.hidden_size
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    attn_params = h * q_dim * 2 + h * kv_dim * 2
    attn_params += (q_dim + 2 * kv_dim if cfg.qkv_bias else 0) + (h if cfg.o_bias else 0)
    attn_norms = h + (2 * cfg.head_dim if cfg.qk_norm else 0)
    mlp_params = 3 * h * cfg.intermediate_size
    shapes = [
        OpShape(
            "embed", "embedding", -1, cfg.vocab_size * h, 0, 0, 0, cfg.vocab_size,
            split_rows=cfg.vocab_size,
        )
    ]  # fmt: skip
    for layer in range(cfg.num_hidden_layers):
        # Attention FLOPs per token: projections plus scores and weighted sum over the context
        # are counted by the cost model, which knows the context length; here only projections.
        shapes.append(
            OpShape(
                f"layers.{layer}.attention",
                "attention",
                layer,
                attn_params,
                attn_norms,
                2 * kv_dim,
                2 * attn_params,
                cfg.num_key_value_heads,
                4 * q_dim,
                cfg.window_of_layer(layer),
                split_biases=q_dim + 2 * kv_dim if cfg.qkv_bias else 0,
                replicated_small=h if cfg.o_bias else 0,
                split_rows=q_dim + 2 * kv_dim,
                replicated_rows=h,
            )
        )
        if cfg.is_moe:
            shapes.append(
                OpShape(
                    f"layers.{layer}.router",
                    "router",
                    layer,
                    h * cfg.num_local_experts,
                    h,
                    0,
                    2 * h * cfg.num_local_experts,
                    cfg.num_local_experts,
                    replicated_small=h * cfg.num_local_experts,
                )
            )
            for expert in range(cfg.num_local_experts):
                shapes.append(
                    OpShape(
                        f"layers.{layer}.experts.{expert}",
                        "expert",
                        layer,
                        mlp_params,
                        0,
                        0,
                        # Expected work per token: a token visits top_k of the experts.
                        2 * mlp_params * cfg.num_experts_per_tok // cfg.num_local_experts,
                        cfg.intermediate_size,
                        split_rows=2 * cfg.intermediate_size,
                        replicated_rows=h,
                    )
                )
        else:
            shapes.append(
                OpShape(
                    f"layers.{layer}.mlp",
                    "mlp",
                    layer,
                    mlp_params,
                    h,
                    0,
                    2 * mlp_params,
                    cfg.intermediate_size,
                    split_rows=2 * cfg.intermediate_size,
                    replicated_rows=h,
                )
            )
    shapes.append(OpShape("final_norm", "final_norm", -1, 0, h, 0, 2 * h, 1))
    lm_params = 0 if cfg.tie_word_embeddings else cfg.vocab_size * h
    shapes.append(
        OpShape(
            "lm_head",
            "lm_head",
            -1,
            lm_params,
            0,
            0,
            2 * cfg.vocab_size * h,
            cfg.vocab_size,
            split_rows=cfg.vocab_size,
            shared_params=cfg.vocab_size * h - lm_params,
        )
    )
    return shapes


def build_ops(cfg: ModelConfig, precision: str) -> list[Op]:
    """The model's ops, in execution order, sized at `precision` (one chunk each)."""
    if precision not in PRECISION_BYTES:
        raise InputError(
            f"unknown precision {precision!r}; one of {', '.join(PRECISION_BYTES)}",
            field="spec.precision",
        )
    width = PRECISION_BYTES[precision]
    scale = SCALE_BYTES if precision in QUANTIZED_PRECISIONS else 0
    ops = []
    for shape in _op_shapes(cfg):
        # Bytes the shards hold, as the compiler stores them: matrices at the precision (a
        # tied LM head holds its copy of the embedding), biases and the router 16-bit, one
        # float32 scale per output row of an int8/fp8 matrix. Replicated: the norms, the o
        # bias, the router and the scales of row-parallel matrices, which every chunk and TP
        # rank holds whole.
        small = shape.split_biases + shape.replicated_small
        split = (shape.params - small + shape.shared_params) * width
        split += shape.split_biases * SMALL_BYTES + shape.split_rows * scale
        replicated = shape.norm_params * NORM_BYTES + shape.replicated_small * SMALL_BYTES
        replicated += shape.replicated_rows * scale
        # Activation handed on after the whole op: the hidden state. (A stage boundary inside
        # an op or a mixture of experts also hands on a partial sum: the planner adds it.)
        act = cfg.hidden_size * ACTIVATION_BYTES
        kv_rows = 2 * cfg.num_key_value_heads * cfg.head_dim if shape.kind == "attention" else 0
        kv_params = kv_rows * (cfg.hidden_size * width + scale)
        kv_params += kv_rows * SMALL_BYTES if cfg.qkv_bias else 0
        ops.append(
            Op(
                name=shape.name,
                kind=shape.kind,
                layer=shape.layer,
                param_bytes=split + replicated,
                kv_bytes_per_token=shape.kv_elems_per_token * width,
                flops_per_token=shape.flops_per_token,
                activation_bytes_per_token=act,
                context_flops_per_position=shape.context_flops_per_position,
                replicated_bytes=replicated,
                kv_window=shape.kv_window,
                kv_param_bytes=kv_params,
            )
        )
    return ops


def chunk_limits(cfg: ModelConfig, mlp_cut_columns: int = 128) -> dict[str, int]:
    """The most pieces each op kind may be cut into (one per query head, 128 vocabulary rows,
    `mlp_cut_columns` intermediate columns — a chip profile's choice)."""
    columns = max(1, cfg.intermediate_size // mlp_cut_columns)
    return {
        "embedding": max(1, cfg.vocab_size // 128),
        "attention": cfg.num_attention_heads,
        "router": 1,
        "mlp": columns,
        "expert": columns,
        "final_norm": 1,
        "lm_head": max(1, cfg.vocab_size // 128),
    }


def split_width(cfg: ModelConfig, kind: str) -> int:
    """Units along the dimension an op of `kind` is cut in: query heads, columns, vocabulary
    rows.

    The partitioner sizes chunks with it and the executor slices weights with it (through
    `chunk_units`), so both agree on where a chunk starts and ends.
    """
    if kind == "attention":
        return cfg.num_attention_heads
    if kind in ("mlp", "expert"):
        return cfg.intermediate_size
    if kind in ("embedding", "lm_head"):
        return cfg.vocab_size
    return 1


def even_split(width: int, parts: int, index: int) -> tuple[int, int]:
    """Units `[start, end)` of piece `index` of `width` cut in `parts` as evenly as possible.

    The first `width % parts` pieces get one unit more — the rule the partitioner sizes
    chunks with.
    """
    base, extra = divmod(width, parts)
    start = index * base + min(index, extra)
    return start, start + base + (index < extra)


def chunk_units(cfg: ModelConfig, kind: str, chunks: int, index: int) -> tuple[int, int]:
    """Units `[start, end)` of chunk `index` of an op of `kind` cut into `chunks`.

    `even_split` of `split_width`, except attention, whose chunks follow the KV groups so that
    a KV head's K/V projections and cache are held twice only where a group must be cut: up to
    one chunk per KV head, chunks are whole KV groups (`even_split` of the KV heads); beyond,
    every KV group is cut into sub-chunks of its query heads (the first `chunks % kv` groups
    into one more), each sub-chunk holding its group's K/V again.
    """
    if kind != "attention":
        return even_split(split_width(cfg, kind), chunks, index)
    kv = cfg.num_key_value_heads
    group = cfg.num_attention_heads // kv
    if chunks <= kv:
        start, end = even_split(kv, chunks, index)
        return start * group, end * group
    base, extra = divmod(chunks, kv)
    big = extra * (base + 1)  # chunks of the groups cut one piece more
    if index < big:
        parts = base + 1
        head, sub = divmod(index, parts)
    else:
        parts = base
        head, sub = divmod(index - big, parts)
        head += extra
    start, end = even_split(group, parts, sub)
    return head * group + start, head * group + end


def kv_heads_of(cfg: ModelConfig, start: int, end: int) -> tuple[int, int]:
    """KV heads `[first, last)` query heads `[start, end)` read (empty for an empty range)."""
    if start >= end:
        return 0, 0
    group = cfg.num_attention_heads // cfg.num_key_value_heads
    return start // group, -(-end // group)
