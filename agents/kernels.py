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

import numpy as np

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


def rope_table(head_dim: int, theta: float, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin tables `[positions, head_dim]` for rotate-half rotary embeddings.

    Angles are computed in float64 and rounded once to float32, so every program of a
    deployment (and the reference executor) builds the same table bit for bit.
    """
    inv_freq = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    angles = np.outer(np.arange(positions, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(F32), np.sin(angles).astype(F32)


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
