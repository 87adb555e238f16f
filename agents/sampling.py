"""Sampling and generation: turn the last stage's logits into tokens, reproducibly.

Greedy or seeded per request, with the seed and the token's sequence position as the only
sources of randomness, so a request's tokens depend on its logits alone — not on timing,
batch or replica. `generate` drives any step function (a pipeline or the reference executor)
through prefill and decode; the lockstep pipeline's last stage uses `sample_token` directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from agents.activation import Activation
from shardformat.errors import ExecutionError


@dataclass(frozen=True)
class Sampling:
    """Greedy when `temperature` is 0; otherwise softmax sampling seeded per request."""

    temperature: float = 0.0
    seed: int = 0


GREEDY = Sampling()
"""The default: pick the most likely token."""

MIN_TEMPERATURE = 1e-6
"""The smallest non-zero temperature accepted. Below it `logits / T` overflows float64 for
ordinary logit gaps (a gap of 1e3 at T = 1e-306 is 1e309 = inf), the softmax becomes NaN and
the draw degenerates to the last token id. Such temperatures are refused, not clamped: a
caller asking for 1e-310 most likely meant greedy (0) and should say so."""


def check_sampling(sampling: Sampling) -> None:
    """Raise ValueError unless the softmax at this temperature can be computed: 0 (greedy) or
    a finite value from `MIN_TEMPERATURE` up."""
    t = sampling.temperature
    if not math.isfinite(t) or t < 0 or 0 < t < MIN_TEMPERATURE:
        raise ValueError(
            f"temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, got {t}"
        )


def sample_token(logits: np.ndarray, sampling: Sampling, index: int) -> int:
    """The token to put at sequence position `index`, from the logits of the row before it.

    Seeded sampling draws from `PCG64([seed, index])`, so a request's tokens depend only on
    its seed and its logits — not on timing, batch or replica.
    """
    check_sampling(sampling)
    if sampling.temperature == 0:
        return int(np.argmax(logits))
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([sampling.seed, index])))
    z = logits.astype(np.float64) / sampling.temperature
    cdf = np.cumsum(np.exp(z - z.max()))
    return int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), len(cdf) - 1))


@dataclass(frozen=True)
class Request:
    """A sequence to generate: prompt token ids, how many tokens to add, in which slot."""

    prompt: tuple[int, ...]
    max_new_tokens: int
    sampling: Sampling = GREEDY
    slot: int = 0


@dataclass(frozen=True)
class Generation:
    """Generated token ids and the logits each was sampled from (`[steps, vocab]`)."""

    tokens: tuple[int, ...]
    logits: np.ndarray

    @property
    def final_logits(self) -> np.ndarray:
        last: np.ndarray = self.logits[-1]
        return last


def generate(
    step: Callable[[Activation], Activation], requests: Sequence[Request]
) -> list[Generation]:
    """Prefill every prompt in one batch, then decode one row per unfinished request per step.

    `step` maps a token batch to the last stage's output (a pipeline or a reference executor).
    """
    if len({r.slot for r in requests}) != len(requests):
        raise ExecutionError("requests of one batch must use distinct slots")
    if any(not r.prompt or r.max_new_tokens < 1 for r in requests):
        raise ExecutionError("every request needs a prompt and max_new_tokens >= 1")
    rows = [(r.slot, p, t) for r in requests for p, t in enumerate(r.prompt)]
    out = step(Activation.for_tokens(*zip(*rows, strict=True)))
    ends = np.cumsum([len(r.prompt) for r in requests]) - 1
    tokens: list[list[int]] = [[] for _ in requests]
    logits: list[list[np.ndarray]] = [[] for _ in requests]
    live = list(range(len(requests)))
    last_logits = {i: out.require_logits()[ends[i]] for i in live}
    while live:
        for i in live:
            r = requests[i]
            logits[i].append(last_logits[i])
            index = len(r.prompt) + len(tokens[i])
            tokens[i].append(sample_token(last_logits[i], r.sampling, index))
        live = [i for i in live if len(tokens[i]) < requests[i].max_new_tokens]
        if not live:
            break
        batch = Activation.for_tokens(
            [requests[i].slot for i in live],
            [len(requests[i].prompt) + len(tokens[i]) - 1 for i in live],
            [tokens[i][-1] for i in live],
        )
        out_logits = step(batch).require_logits()
        last_logits = {i: out_logits[j] for j, i in enumerate(live)}
    return [Generation(tuple(t), np.stack(lg)) for t, lg in zip(tokens, logits, strict=True)]
