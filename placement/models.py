"""Model architectures and the op list the partitioner cuts into pipeline stages.

A model is described by the handful of numbers of a Hugging Face Llama/Mistral/Mixtral
`config.json`. From them `build_ops` derives an ordered list of ops finer than layers
(embedding, per layer attention and MLP — or router plus one op per expert —, final norm, LM
head), each with its parameter bytes at a precision, KV-cache bytes per token, FLOPs per token and
the activation bytes it hands to the next op. Presets carry the published configs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from placement.errors import InputError

PRECISION_BYTES: dict[str, int] = {"fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
"""Bytes per weight element. The KV cache is stored at the same width as the weights (int8/fp8
deployments keep a quantized cache); norm weights and activations stay 16-bit."""

ACTIVATION_BYTES = 2
NORM_BYTES = 2


@dataclass(frozen=True)
class ModelConfig:
    """The architecture numbers that size a decoder-only transformer (Llama family)."""

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

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)

    @property
    def is_moe(self) -> bool:
        return self.num_local_experts > 0

    def parameter_count(self) -> int:
        """Total parameters, counted the same way `build_ops` sizes the ops."""
        return sum(op.params for op in _op_shapes(self))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


MODEL_PRESETS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        ModelConfig("llama-2-7b", 32000, 4096, 11008, 32, 32, 32, max_position_embeddings=4096),
        ModelConfig("llama-2-70b", 32000, 8192, 28672, 80, 64, 8, max_position_embeddings=4096),
        ModelConfig(
            "llama-3-8b",
            128256,
            4096,
            14336,
            32,
            32,
            8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
        ModelConfig(
            "llama-3-70b",
            128256,
            8192,
            28672,
            80,
            64,
            8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
        ModelConfig(
            "llama-3.1-405b",
            128256,
            16384,
            53248,
            126,
            128,
            8,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
        ModelConfig(
            "mixtral-8x7b",
            32000,
            4096,
            14336,
            32,
            32,
            8,
            num_local_experts=8,
            num_experts_per_tok=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
        ),
        # A few million parameters: small enough to execute in numpy, large enough that the
        # `dev` chip profile needs a dozen chips for it.
        ModelConfig(
            "tiny-llama",
            4096,
            256,
            704,
            8,
            8,
            4,
            max_position_embeddings=1024,
            rms_norm_eps=1e-6,
        ),
    )
}


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


_SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
_SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral")
_REQUIRED_HF_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
)
_MAX_CONFIG_BYTES = 1 << 20


def model_from_hf_config(path: str | Path, name: str | None = None) -> ModelConfig:
    """Read a Hugging Face `config.json` of the Llama, Mistral or Mixtral family.

    Raises `InputError` naming the file and key for anything missing, mistyped or unsupported.
    """
    source = str(path)
    p = Path(path)
    try:
        if p.stat().st_size > _MAX_CONFIG_BYTES:
            raise InputError("config file is larger than 1 MiB", source=source)
        raw = json.loads(p.read_text(encoding="utf-8"))
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
    return model_from_hf_dict(raw, source=source, name=name or p.parent.name or p.stem)


def model_from_hf_dict(raw: dict[str, Any], *, source: str, name: str) -> ModelConfig:
    """Build a `ModelConfig` from the keys of a Hugging Face config dict."""
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    known_arch = isinstance(archs, list) and any(a in _SUPPORTED_ARCHITECTURES for a in archs)
    if model_type not in _SUPPORTED_MODEL_TYPES and not known_arch:
        raise InputError(
            f"unsupported model_type {model_type!r}; supported: "
            f"{', '.join(_SUPPORTED_MODEL_TYPES)}",
            source=source,
            field="model_type",
        )
    for key in _REQUIRED_HF_KEYS:
        if key not in raw:
            raise InputError("required key is missing", source=source, field=key)
    ints = {}
    for key in (
        *_REQUIRED_HF_KEYS,
        "num_key_value_heads",
        "head_dim",
        "num_local_experts",
        "num_experts_per_tok",
        "max_position_embeddings",
    ):
        if key in raw and raw[key] is not None:
            ints[key] = _positive_int(raw[key], source=source, field=key)
    heads = ints["num_attention_heads"]
    kv_heads = ints.get("num_key_value_heads", heads)
    if heads % kv_heads:
        raise InputError(
            f"num_attention_heads ({heads}) must be a multiple of num_key_value_heads ({kv_heads})",
            source=source,
            field="num_key_value_heads",
        )
    head_dim = ints.get("head_dim", 0)
    if not head_dim and ints["hidden_size"] % heads:
        raise InputError(
            f"hidden_size ({ints['hidden_size']}) is not a multiple of num_attention_heads "
            f"({heads}) and no head_dim is given",
            source=source,
            field="hidden_size",
        )
    experts = ints.get("num_local_experts", 0)
    top_k = ints.get("num_experts_per_tok", min(2, experts))  # the Mixtral default
    if experts and top_k > experts:
        raise InputError(
            f"num_experts_per_tok ({top_k}) exceeds num_local_experts ({experts})",
            source=source,
            field="num_experts_per_tok",
        )
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
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        max_position_embeddings=ints.get("max_position_embeddings", 4096),
        rope_theta=float(raw.get("rope_theta", 10000.0)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
    )


_MAX_DIMENSION = 1 << 24


def _positive_int(value: Any, *, source: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"must be an integer, got {value!r}", source=source, field=field)
    if not 1 <= value <= _MAX_DIMENSION:
        raise InputError(
            f"must be between 1 and {_MAX_DIMENSION}, got {value}", source=source, field=field
        )
    return value


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


@dataclass(frozen=True)
class Op:
    """One op sized at a precision: the unit the partitioner places.

    The partitioner may cut a large op into chunks along its split dimension (`split_width`:
    KV heads for attention, columns for MLP and experts, vocabulary rows for embedding and LM
    head) so that stage boundaries can fall inside it.
    """

    name: str
    kind: str
    layer: int
    param_bytes: int
    kv_bytes_per_token: int
    flops_per_token: int
    activation_bytes_per_token: int
    context_flops_per_position: int = 0
    replicated_bytes: int = 0  # norm weights: every TP rank and every chunk holds a copy


def _op_shapes(cfg: ModelConfig) -> list[OpShape]:
    h = cfg.hidden_size
    q_dim = cfg.num_attention_heads * cfg.head_dim
    kv_dim = cfg.num_key_value_heads * cfg.head_dim
    attn_params = h * q_dim * 2 + h * kv_dim * 2
    mlp_params = 3 * h * cfg.intermediate_size
    shapes = [OpShape("embed", "embedding", -1, cfg.vocab_size * h, 0, 0, 0, cfg.vocab_size)]
    for layer in range(cfg.num_hidden_layers):
        # Attention FLOPs per token: projections plus scores and weighted sum over the context
        # are counted by the cost model, which knows the context length; here only projections.
        shapes.append(
            OpShape(
                f"layers.{layer}.attention",
                "attention",
                layer,
                attn_params,
                h,
                2 * kv_dim,
                2 * attn_params,
                cfg.num_key_value_heads,
                4 * q_dim,
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
    ops = []
    for shape in _op_shapes(cfg):
        # Activation handed on after the whole op: the hidden state. (A stage boundary inside
        # an op or a mixture of experts also hands on a partial sum: the planner adds it.)
        act = cfg.hidden_size * ACTIVATION_BYTES
        ops.append(
            Op(
                name=shape.name,
                kind=shape.kind,
                layer=shape.layer,
                param_bytes=shape.params * width + shape.norm_params * NORM_BYTES,
                kv_bytes_per_token=shape.kv_elems_per_token * width,
                flops_per_token=shape.flops_per_token,
                activation_bytes_per_token=act,
                context_flops_per_position=shape.context_flops_per_position,
                replicated_bytes=shape.norm_params * NORM_BYTES,
            )
        )
    return ops


def chunk_limits(cfg: ModelConfig) -> dict[str, int]:
    """The most pieces each op kind may be cut into (one per head group, column block, ...)."""
    return {
        "embedding": max(1, cfg.vocab_size // 128),
        "attention": cfg.num_key_value_heads,
        "router": 1,
        "mlp": max(1, cfg.intermediate_size // 128),
        "expert": max(1, cfg.intermediate_size // 128),
        "final_norm": 1,
        "lm_head": max(1, cfg.vocab_size // 128),
    }


def split_width(cfg: ModelConfig, kind: str) -> int:
    """Units along the dimension an op of `kind` is cut in: KV heads, columns, vocabulary rows.

    The partitioner sizes chunks with it and the executor slices weights with it, so both
    agree on where a chunk starts and ends.
    """
    if kind == "attention":
        return cfg.num_key_value_heads
    if kind in ("mlp", "expert"):
        return cfg.intermediate_size
    if kind in ("embedding", "lm_head"):
        return cfg.vocab_size
    return 1
