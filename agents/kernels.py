"""Deterministic float32 numpy kernels for the Llama family, one sequence row at a time.

Why one row at a time: BLAS picks different kernels (and so different summation orders) for
different matrix shapes, and numpy may reorder a reduction over a 2-D array. A batched
`X @ W.T` therefore gives a row bits that depend on how many other rows share the batch. Every
kernel here takes one row (a 1-D hidden vector, or per-row small matrices whose shapes depend
only on the model and the row's position), so a sequence's bits never depend on its neighbours.

Elementwise operations (add, multiply, exp) are exact per element and may be applied to whole
batches; anything that reduces (matrix products, norms, softmax) must go through these kernels.

Everything computes in float32; scalars are float32 too, so no float64 creeps into a result.
BLAS must run single-threaded: a threaded gemv splits the output rows among threads, and a
row's bits then depend on the split (see `agents.blas_threads.pin_blas_threads`).
"""

from __future__ import annotations

import math

import numpy as np

from placement.models import ModelConfig, RopeScaling

F32 = np.float32
_ONE = F32(1.0)


def as_f32(array: np.ndarray) -> np.ndarray:
    """`array` as C-contiguous float32: the same object when it already is (zero-copy)."""
    return np.ascontiguousarray(array, dtype=F32)


def matvec(weight: np.ndarray, x: np.ndarray) -> np.ndarray:
    """`weight @ x` for a Hugging Face `[out, in]` matrix and one row: a single sgemv."""
    out: np.ndarray = weight @ x
    return out


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Llama RMSNorm of one row: `weight * x / sqrt(mean(x²) + eps)`."""
    variance = np.mean(x * x, dtype=F32)
    inv = _ONE / np.sqrt(variance + F32(eps))
    out: np.ndarray = weight * (x * inv)
    return out


def rms_norm_rows(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """`rms_norm` of every row of `x [rows, dim]` (Qwen3's q/k norm per head), row by row."""
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        out[i] = rms_norm(x[i], weight, eps)
    return out


def rope_inv_freq(head_dim: int, theta: float, rope: RopeScaling | None = None) -> np.ndarray:
    """Inverse frequencies `[head_dim / 2]` (float64) of a position-independent rope type.

    The formulas are transformers 5.x `modeling_rope_utils` (`_compute_*_parameters`), in
    float64 where transformers uses float32 (so tables differ from transformers' by float32
    rounding, not by formula). `dynamic` depends on the position: see `rope_table`.
    """
    rope = rope or RopeScaling()
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        old = float(rope.original_max_position_embeddings)
        low_wavelen, high_wavelen = old / rope.low_freq_factor, old / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (old / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        out: np.ndarray = np.where(medium, smoothed, scaled)
        return out
    if rope.rope_type == "yarn":
        return _yarn_inv_freq(head_dim, theta, rope)
    return inv_freq


def _yarn_inv_freq(dim: int, base: float, rope: RopeScaling) -> np.ndarray:
    def correction_dim(rotations: float) -> float:
        orig = rope.original_max_position_embeddings
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
    extrapolation_factor = 1 - ramp
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    interpolation = 1.0 / (rope.factor * pos_freqs)
    out: np.ndarray = (
        interpolation * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    )
    return out


def rope_table(
    head_dim: int, theta: float, positions: int, rope: RopeScaling | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables `[positions, head_dim]` for rotate-half rotary embeddings.

    Angles are computed in float64 and rounded once to float32, so every program of a
    deployment (and the reference executor) builds the same table bit for bit. yarn's
    attention factor multiplies cos and sin, as transformers does.

    `dynamic` (NTK): transformers recomputes the base from the longest position of the current
    forward call, so its prefill of a prompt longer than `original_max_position_embeddings`
    rotates early positions with the stretched base. A position here always uses the base for a
    sequence ending at that position — what transformers computes when decoding token by
    token — so a row's bits never depend on how a prompt was cut into steps. Within the
    original context both are the plain default rope.
    """
    rope = rope or RopeScaling()
    pos = np.arange(positions, dtype=np.float64)
    if rope.rope_type == "dynamic":
        orig = rope.original_max_position_embeddings
        seq_len = np.maximum(pos + 1, orig)
        base = theta * ((rope.factor * seq_len / orig) - (rope.factor - 1)) ** (
            head_dim / (head_dim - 2)
        )
        exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
        angles = pos[:, None] / (base[:, None] ** exponents[None, :])
    else:
        angles = np.outer(pos, rope_inv_freq(head_dim, theta, rope))
    angles = np.concatenate([angles, angles], axis=1)
    scale = rope.attention_factor
    return (np.cos(angles) * scale).astype(F32), (np.sin(angles) * scale).astype(F32)


def model_rope_table(cfg: ModelConfig, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """`rope_table` for a model's head_dim, theta and scaling."""
    return rope_table(cfg.head_dim, cfg.rope_theta, positions, cfg.rope)


def apply_rope(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate heads `x [heads, head_dim]` by one position's `cos`/`sin` rows (HF rotate-half)."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[:, half:], x[:, :half]], axis=1)
    out: np.ndarray = x * cos + rotated * sin
    return out


def softmax(scores: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, max-subtracted, in float32."""
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    out: np.ndarray = shifted / shifted.sum(axis=-1, keepdims=True)
    return out


def attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: np.float32) -> np.ndarray:
    """Causal attention of one row for the query heads of one KV head.

    `q [group, head_dim]` (already rotated), `k`/`v [positions_so_far, head_dim]` the cached
    keys and values of this sequence up to and including the row's own position.
    """
    probs = softmax((q @ k.T) * scale)
    out: np.ndarray = probs @ v
    return out


def silu(x: np.ndarray) -> np.ndarray:
    out: np.ndarray = x / (_ONE + np.exp(-x))
    return out


def swiglu(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """The Llama MLP activation: `silu(gate) * up`."""
    out: np.ndarray = silu(gate) * up
    return out


def mlp_partial(xn: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """Down-projection of the intermediate columns this weight slice holds (a partial sum)."""
    return matvec(down, swiglu(matvec(gate, xn), matvec(up, xn)))


def route(router_logits: np.ndarray, top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mixtral routing of one row: softmax, top-k, weights renormalized to sum to one.

    Returns expert ids in ascending order (the fixed order experts are summed in) and their
    float32 weights. Ties go to the lower expert id (stable sort), so selection is exact.
    """
    probs = softmax(router_logits)
    chosen = np.sort(np.argsort(-probs, kind="stable")[:top_k])
    weights = probs[chosen]
    return chosen.astype(np.int32), (weights / weights.sum(dtype=F32)).astype(F32)
