"""What a shard stores at a deployment's precision, and how the executor reads it back.

A deployment's `precision` decides the stored dtype of every weight the compiler writes —
whatever dtype the checkpoint holds (F32, F16 or BF16):

* `fp16` / `bf16`: every tensor is F16 / BF16, rounded to nearest even from the checkpoint's
  values (widened to float32 first, so an F16 → BF16 conversion rounds once).
* `int8`: the matrices (projections, experts, embedding, LM head) are I8, symmetric, one float32
  scale per output channel (row of the Hugging Face `[out, in]` matrix; per token for the
  embedding): `scale = max|row| / 127`, `q = clip(round_half_even(w / scale), -127, 127)`.
* `fp8`: the same matrices as F8_E4M3 (the `e4m3fn` format: bias 7, no infinities, max 448),
  one float32 scale per output channel, `scale = max|row| / 448`, rounded to nearest even.
* Kept 16-bit (F16) at int8/fp8, as the plan sizes them (`placement.models.NORM_BYTES`): norm
  weights, biases and the MoE router (routing picks experts by small logit gaps; the router is
  `experts × hidden`, negligible next to the experts).

A quantized matrix `name` has its scales in the tensor `scale_name(name)` (`[rows]` F32), cut
with the matrix's rows. The scales are those of the WHOLE checkpoint row, also when the shard
holds only some of its columns (the row-parallel o/down projections), so every plan — any chunk
cuts, any TP width — holds the same quantized weights as the whole model, and stage-by-stage
execution stays bit-identical to the reference executor run on `deployed_tensors`.

The executor dequantizes once at load (`dequantize`: `q * scale` in float32) and computes in
float32 as for the other precisions.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from shardformat.codec import decode_f32
from shardformat.errors import ExecutionError

F32 = np.float32
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "fp8")
MATRIX_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "I8", "fp8": "F8_E4M3"}
"""Stored dtype of the matrices at each precision."""
SMALL_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16", "int8": "F16", "fp8": "F16"}
"""Stored dtype of norms, biases and the router at each precision."""
QUANTIZED_DTYPES = ("I8", "F8_E4M3")
SCALE_SUFFIX = "_scale"
INT8_MAX = 127.0
FP8_E4M3_MAX = 448.0


def _fp8_e4m3_values() -> np.ndarray:
    """The float value of each of the 256 e4m3fn bit patterns (NaN for 0x7F and 0xFF)."""
    bits = np.arange(256)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exponent, mantissa = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(
        exponent == 0,
        mantissa / 8.0 * 2.0**-6,
        (1.0 + mantissa / 8.0) * 2.0 ** (exponent - 7.0),
    )
    value = sign * value
    value[(bits & 0x7F) == 0x7F] = np.nan
    return value.astype(F32)


FP8_E4M3_VALUES = _fp8_e4m3_values()
_FP8_POSITIVE = FP8_E4M3_VALUES[:127]  # 0x00 … 0x7E: 0 … 448, increasing


def is_matrix(name: str, ndim: int) -> bool:
    """Whether tensor `name` (shard or checkpoint name) is quantized at int8/fp8."""
    return ndim == 2 and not name.endswith("block_sparse_moe.gate.weight")


def storage_dtype(precision: str, name: str, ndim: int) -> str:
    """The dtype tensor `name` (with `ndim` dimensions) is stored in at `precision`."""
    if precision not in MATRIX_DTYPES:
        raise ExecutionError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
    return (MATRIX_DTYPES if is_matrix(name, ndim) else SMALL_DTYPES)[precision]


def scale_name(name: str) -> str:
    """The shard tensor holding the per-row scales of quantized matrix `name`."""
    return name + SCALE_SUFFIX


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), rounding to nearest even (values are finite)."""
    bits = np.ascontiguousarray(values, dtype=F32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def row_scales(values: np.ndarray, dtype: str) -> np.ndarray:
    """Per-row float32 scales of a float32 matrix for `dtype` (I8 or F8_E4M3).

    An all-zero row gets scale 1 (its codes are all zero whatever the scale)."""
    top = F32(INT8_MAX if dtype == "I8" else FP8_E4M3_MAX)
    amax = np.max(np.abs(values), axis=1).astype(F32)
    return np.where(amax > 0, amax / top, F32(1.0)).astype(F32)


def fp8_e4m3_bits(values: np.ndarray) -> np.ndarray:
    """float32 values with |v| ≤ 448 → e4m3fn bits (uint8), rounding to nearest even (as
    `torch.float8_e4m3fn` conversion does, negative zero included).

    In each binade [2^e, 2^(e+1)) the format's step is 2^(e-3) (2^-9 below 2^-6, the
    subnormals); `np.rint` of v / step rounds half to even, which is an even mantissa. The
    rounded magnitude is an e4m3 value exactly and is looked up for its bits.
    """
    v = np.asarray(values, dtype=F32)
    mag = np.abs(v)
    if np.any(mag > FP8_E4M3_MAX) or not np.all(np.isfinite(v)):
        raise ExecutionError("fp8 e4m3 values must be finite and within ±448")
    _, exp2 = np.frexp(mag)  # mag = m * 2**exp2, m in [0.5, 1): binade exponent exp2 - 1
    step = np.ldexp(F32(1.0), np.maximum(exp2 - 1, -6) - 3).astype(F32)
    rounded = (np.rint(mag / step) * step).astype(F32)
    code = np.searchsorted(_FP8_POSITIVE, rounded).astype(np.uint8)
    out: np.ndarray = np.where(np.signbit(v), code | np.uint8(0x80), code).astype(np.uint8)
    return out


def quantize(values: np.ndarray, dtype: str, scales: np.ndarray) -> np.ndarray:
    """A float32 matrix as stored codes of `dtype` (I8 or F8_E4M3) with the given row scales."""
    scaled = np.asarray(values, dtype=F32) / scales[:, None]
    if dtype == "I8":
        codes: np.ndarray = np.clip(np.rint(scaled), -INT8_MAX, INT8_MAX).astype(np.int8)
        return codes
    if dtype == "F8_E4M3":
        return fp8_e4m3_bits(np.clip(scaled, -FP8_E4M3_MAX, FP8_E4M3_MAX))
    raise ExecutionError(f"dtype {dtype} is not a quantized dtype")


def encode(values: np.ndarray, dtype: str, scales: np.ndarray | None = None) -> np.ndarray:
    """float32 values in the stored form of `dtype` (quantized ones need their row scales)."""
    if dtype == "F32":
        return np.ascontiguousarray(values, dtype=F32)
    if dtype == "F16":
        return np.asarray(values, dtype=F32).astype(np.float16)
    if dtype == "BF16":
        return to_bf16_bits(values)
    if scales is None:
        raise ExecutionError(f"storing {dtype} needs the row scales")
    return quantize(values, dtype, scales)


def dequantize(raw: np.ndarray, dtype: str, scales: np.ndarray) -> np.ndarray:
    """Stored I8/F8_E4M3 codes `[rows, cols]` and their `[rows]` scales → float32 weights."""
    if raw.ndim != 2 or scales.shape != (raw.shape[0],):
        raise ExecutionError(
            f"scales of shape {list(scales.shape)} do not fit a {list(raw.shape)} matrix"
        )
    if dtype == "I8":
        codes = raw.astype(F32)
    elif dtype == "F8_E4M3":
        codes = FP8_E4M3_VALUES[raw.view(np.uint8)]
        if np.isnan(codes).any():
            raise ExecutionError("fp8 weights hold a NaN code")
    else:
        raise ExecutionError(f"dtype {dtype} is not a quantized dtype")
    out: np.ndarray = codes * np.asarray(scales, dtype=F32)[:, None]
    return out


def round_trip(name: str, values: np.ndarray, precision: str) -> np.ndarray:
    """A whole checkpoint tensor as float32 after storing it at `precision` and reading it back.

    What every plan's shards hold of it (see the module docstring), so the reference executor
    on these values is the oracle of quantized deployments too."""
    full = np.asarray(values, dtype=F32)
    dtype = storage_dtype(precision, name, full.ndim)
    if dtype in QUANTIZED_DTYPES:
        scales = row_scales(full, dtype)
        return dequantize(quantize(full, dtype, scales), dtype, scales)
    return decode_f32(encode(full, dtype), dtype)


class DeployedTensors(Mapping[str, np.ndarray]):
    """Checkpoint tensors (float) as a deployment at `precision` holds them, computed lazily."""

    def __init__(self, tensors: Mapping[str, np.ndarray], precision: str) -> None:
        if precision not in MATRIX_DTYPES:
            raise ExecutionError(f"unknown precision {precision!r}; one of {', '.join(PRECISIONS)}")
        self.tensors, self.precision = tensors, precision

    def __getitem__(self, name: str) -> np.ndarray:
        return round_trip(name, self.tensors[name], self.precision)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)
