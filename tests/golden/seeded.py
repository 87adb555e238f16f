"""Seeded weights for the golden models, regenerated bit for bit without torch.

The golden fixtures store no weights: `make_golden.py` generates every tensor of a tiny model
here, loads them into transformers, and records its outputs; the tests regenerate the same
tensors and feed them to Lockstep's executor. Each tensor has its own generator, seeded by
(seed, crc32 of its name), so the values do not depend on the order tensors are listed in.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import numpy as np


def seeded_tensor(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """One float32 tensor: norm weights near 1, biases small, matrices ~ N(0, 1/fan_in).

    Scales are chosen so that logits of a 2-layer model are O(1) and differ clearly between
    tokens: greedy decoding then has no near-ties that float32 noise could flip. Values are
    rounded to float16 (and stored as float32), so a deployment at fp16 holds exactly the
    weights transformers ran in float32.
    """
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    normal = rng.standard_normal(shape)
    if name.endswith("norm.weight"):
        values = 1.0 + 0.1 * normal
    elif name.endswith(".bias"):
        values = 0.1 * normal
    elif "embed_tokens" in name:
        values = normal
    else:
        values = normal / np.sqrt(shape[-1])
    return values.astype(np.float16).astype(np.float32)


def seeded_tensors(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, np.ndarray]:
    return {name: seeded_tensor(name, tuple(shape), seed) for name, shape in shapes.items()}
