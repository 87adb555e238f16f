"""Reference-executor benchmark: tokens/s per architecture and precision, and quantization error.

For each tiny model — the golden architectures (tests/golden/fixtures: Llama with llama3 rope,
Llama with attention bias and tied embeddings, Mistral with a 4-position window, Mixtral, Qwen2
with a window from layer 1, Qwen3; 2 layers, hidden 64) and tiny-llama (8 layers, hidden 256,
vocabulary 4096) — with seeded weights (`orchestrator.weights.SeededWeights`, fp16) held at
each precision (`shardformat.precision.DeployedTensors`: fp16, bf16, int8, fp8 e4m3):

* decode tokens/s: greedy generation of `--tokens` tokens after an 8-token prompt, one
  sequence, single-threaded BLAS (the reference executor's determinism setting), median of
  `--repeats`. The executor dequantizes once at load and computes in float32, so precision
  does not change its speed (a real chip's would): the figures show that, and the cost of each
  architecture's extra work (biases, q/k norms, windows, experts).
* logit error against the fp16 model, teacher-forced on a 40-token sequence: max |Δlogit| /
  max |logit| and the share of positions whose top token agrees.

It also prints a text prompt and the tiny model's completion through the tiny tokenizer (the
weights are random: the completion is not language, the path is the real one).

The last line of output is one JSON object with every figure.

Run: `.venv/bin/python -m bench.executor [--tokens N] [--repeats N] [--text-only]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from agents.blas_threads import pin_blas_threads
from agents.executor import ReferenceExecutor
from agents.tokenizer import TextCodec
from orchestrator.weights import SeededWeights, tiny_text_spec
from placement.models import ModelConfig, model_from_hf_config, model_preset
from shardformat.precision import DeployedTensors

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "golden" / "fixtures"
CASES = (
    "llama-llama3",
    "llama-tied-bias",
    "mistral-window",
    "mixtral",
    "qwen2-window",
    "qwen3",
)
PRECISIONS = ("fp16", "bf16", "int8", "fp8")
SEED = 7
PROMPT = (1, 5, 17, 42, 7, 9, 30, 2)
TEXT_PROMPT = "Lockstep serves the models people bring:"


def models() -> dict[str, ModelConfig]:
    out = {name: model_from_hf_config(FIXTURES / name / "config.json", name=name) for name in CASES}
    out["tiny-llama"] = model_preset("tiny-llama")
    return out


def weights(cfg: ModelConfig) -> dict[str, np.ndarray]:
    seeded = SeededWeights(cfg, SEED, "F16")
    return {name: seeded[name] for name in seeded}


def decode_rate(cfg: ModelConfig, tensors: DeployedTensors, tokens: int, repeats: int) -> float:
    context = len(PROMPT) + tokens
    samples = []
    for _ in range(repeats):
        run = ReferenceExecutor(cfg, tensors, max_context=context)
        run.prefill(PROMPT)
        token, position = PROMPT[-1], len(PROMPT)
        started = time.perf_counter()
        for _ in range(tokens):
            logits = run.decode([token], [position], [0])
            token, position = int(np.argmax(logits[0])), position + 1
        samples.append(time.perf_counter() - started)
    return tokens / statistics.median(samples)


def logit_error(
    cfg: ModelConfig, reference: np.ndarray, tensors: DeployedTensors, sequence: list[int]
) -> tuple[float, float]:
    got = ReferenceExecutor(cfg, tensors, max_context=len(sequence)).prefill(sequence)
    error = float(np.abs(got - reference).max() / np.abs(reference).max())
    agree = float(np.mean(got.argmax(axis=1) == reference.argmax(axis=1)))
    return error, agree


def text_demo() -> dict[str, object]:
    cfg = model_preset("tiny-llama")
    codec = TextCodec(tiny_text_spec())
    ids = codec.encode(TEXT_PROMPT)
    run = ReferenceExecutor(cfg, SeededWeights(cfg, SEED, "F16"), max_context=64)
    generated = run.generate(ids, 16).tokens
    decoder = codec.stream()
    pieces = [decoder.push(t) for t in generated]
    completion = "".join(pieces)
    print(f"text prompt {TEXT_PROMPT!r} ({len(ids)} tokens) -> completion {completion!r}")
    return {"prompt": TEXT_PROMPT, "prompt_ids": ids, "tokens": list(generated), "text": completion}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--text-only", action="store_true", help="only the text demo")
    args = parser.parse_args()
    pin_blas_threads()
    if args.text_only:
        print(json.dumps({"bench": "executor", "text_demo": text_demo()}, sort_keys=True))
        return
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'model':16} {'precision':9} {'tokens/s':>9} {'max rel err':>12} {'top-1':>6}")
    for name, cfg in models().items():
        tensors = weights(cfg)
        sequence = [int(t) for t in rng.integers(0, cfg.vocab_size, 40)]
        fp16 = DeployedTensors(tensors, "fp16")
        reference = ReferenceExecutor(cfg, fp16, max_context=len(sequence)).prefill(sequence)
        results[name] = {}
        for precision in PRECISIONS:
            deployed = DeployedTensors(tensors, precision)
            rate = decode_rate(cfg, deployed, args.tokens, args.repeats)
            error, agree = logit_error(cfg, reference, deployed, sequence)
            results[name][precision] = {
                "tokens_per_s": round(rate, 1),
                "max_rel_logit_error": error,
                "top1_agreement": agree,
            }
            print(f"{name:16} {precision:9} {rate:9.1f} {error:12.2e} {agree:6.1%}")
    worst = {
        p: max(r[p]["max_rel_logit_error"] for r in results.values())
        for p in ("bf16", "int8", "fp8")
    }
    print(
        "worst max |Δlogit| / max |logit| against fp16: "
        + ", ".join(f"{p} {e:.2e}" for p, e in worst.items())
    )
    demo = text_demo()
    summary = {
        "bench": "executor",
        "decode_tokens": args.tokens,
        "repeats": args.repeats,
        "results": results,
        "worst_rel_logit_error_vs_fp16": worst,
        "text_demo": demo,
    }
    print(json.dumps(summary, sort_keys=True))


if __name__ == "__main__":
    main()
