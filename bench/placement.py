"""Placement benchmark: plan time, chips against the SRAM lower bound, incremental re-plan time.

Plans llama-3-8b, llama-3-70b, llama-3.1-405b and mixtral-8x7b (int8, 4k context, batch 8,
one replica, one spare node per rack) on 1, 8 and 145 groq-rack racks, several repetitions each,
and reports medians. Re-plan: one chip of the 405B plan on 145 racks fails, at several places
along the pipeline; the baseline measured in the same run is planning that failure from scratch
(a full `make_plan` on the topology with the chip marked failed), and the ratio says how much
the incremental path saves.

Targets (issue 2): 405B on 145 racks under 1 s; re-plan under 10 ms; chipsUsed within 5 % of
the lower bound or explained (issue 12: within 3 %, `within_3_percent`). Then every preset
(int8, 4k context, batch 1, 4 and 8, 145 racks, no spares) against its lower bound and its
`chipsTarget` (x1.03, or the fewest chips of the finest pieces where that is more):
`presets_within_target`, and the cases over x1.03 with their target. The last line of output
is one JSON object with the figures.

Plan time is the wall-clock median ("plan ms") and the least CPU time of the repetitions
("cpu ms", steadier on a shared machine).

Run: `make bench` or `.venv/bin/python -m bench.placement [--repeats N] [--racks 1,2,4,...,145]`
(`--racks` sweeps cluster sizes for the plan-time figure of `python -m bench.report`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

from placement.errors import Unplaceable
from placement.models import MODEL_PRESETS, model_preset
from placement.planner import PlanRequest, make_plan
from placement.replan import replan_failed
from placement.topology import ChipState, preset_topology

MODELS = ("llama-3-8b", "llama-3-70b", "llama-3.1-405b", "mixtral-8x7b")
RACKS = (1, 8, 145)
# `--racks` for the plan-time-against-cluster-size figure (`bench.report`): from one rack to
# Groq's largest published system, 145 racks (10,440 chips).
SWEEP_RACKS = (1, 2, 4, 8, 16, 36, 72, 145)


def rack_list(text: str) -> tuple[int, ...]:
    """`--racks 1,8,145`: rack counts, each a positive integer, 145 among them (the summary's
    405B figure is taken there)."""
    try:
        racks = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--racks: integers separated by commas, got {text!r}"
        ) from None
    if not racks or racks[0] < 1 or 145 not in racks:
        raise argparse.ArgumentTypeError(f"--racks: positive, and 145 among them, got {text!r}")
    return racks


def request(model: str) -> PlanRequest:
    return PlanRequest(
        model, model_preset(model), "int8", replicas=1, max_context=4096, max_batch=8
    )


def preset_sweep() -> list[dict[str, Any]]:
    """Every groq-rack preset at int8, 4k context, batch 1, 4 and 8 on 145 racks."""
    topo = preset_topology(145, "groq-rack")
    print(
        f"\n{'preset':16} {'batch':>5} {'cpu ms':>8} {'chips':>6} {'bound':>6} {'target':>6} ratio"
    )
    rows: list[dict[str, Any]] = []
    for name in sorted(MODEL_PRESETS):
        if name == "tiny-llama":  # a dev-profile model
            continue
        for batch in (1, 4, 8):
            req = PlanRequest(name, model_preset(name), "int8", 1, 4096, batch, spares_per_rack=0)
            started = time.process_time()
            plan = make_plan(req, topo)
            cpu = time.process_time() - started
            ratio = plan.chips_used / plan.chips_lower_bound
            print(
                f"{name:16} {batch:>5} {cpu * 1e3:>8.1f} {plan.chips_used:>6} "
                f"{plan.chips_lower_bound:>6} {plan.chips_target:>6} {ratio:.4f}"
            )
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "chips_used": plan.chips_used,
                    "chips_lower_bound": plan.chips_lower_bound,
                    "chips_target": plan.chips_target,
                    "ratio": round(ratio, 4),
                    "plan_cpu_seconds": round(cpu, 4),
                }
            )
    return rows


def timed(fn, repeats: int) -> tuple[float, object, float]:  # type: ignore[no-untyped-def]
    """(wall-clock median, last result, least CPU time) of `repeats` calls. On a shared,
    loaded machine the wall-clock median moves with the other processes; the least CPU time
    of this process much less, so before/after comparisons use it."""
    samples, cpu, result = [], [], None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        try:
            result = fn()
        except Unplaceable as exc:
            result = exc
        samples.append(time.perf_counter() - started)
        cpu.append(time.process_time() - started_cpu)
    return statistics.median(samples), result, min(cpu)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--racks",
        type=rack_list,
        default=RACKS,
        help=f"rack counts, e.g. {','.join(map(str, SWEEP_RACKS))} (default 1,8,145)",
    )
    args = parser.parse_args()

    rows = []
    print(
        f"{'model':16} {'racks':>5} {'plan ms':>9} {'cpu ms':>8} {'TP':>3} {'stages':>6} "
        f"{'chips':>6} {'bound':>6} {'ratio':>6}  tokens/s/user"
    )
    for model in MODELS:
        for racks in args.racks:
            topo = preset_topology(racks, "groq-rack")
            seconds, result, cpu = timed(
                lambda t=topo, m=model: make_plan(request(m), t), args.repeats
            )
            if isinstance(result, Unplaceable):
                print(
                    f"{model:16} {racks:>5} {seconds * 1e3:>9.2f} {cpu * 1e3:>8.2f}  "
                    f"does not fit: {result}"
                )
                rows.append(
                    {
                        "model": model,
                        "racks": racks,
                        "plan_seconds": seconds,
                        "plan_cpu_seconds_min": cpu,
                        "fits": False,
                        "reason": str(result),
                    }
                )
                continue
            plan = result
            ratio = plan.chips_used / plan.chips_lower_bound
            print(
                f"{model:16} {racks:>5} {seconds * 1e3:>9.2f} {cpu * 1e3:>8.2f} "
                f"{plan.tensor_parallel:>3} "
                f"{plan.pipeline_stages:>6} {plan.chips_used:>6} {plan.chips_lower_bound:>6} "
                f"{ratio:>6.3f}  {plan.predicted.tokens_per_second_per_user:,.1f}"
            )
            for note in plan.notes[1:]:
                print(f"{'':24}note: {note}")
            rows.append(
                {
                    "model": model,
                    "racks": racks,
                    "plan_seconds": seconds,
                    "plan_cpu_seconds_min": cpu,
                    "fits": True,
                    "chips_used": plan.chips_used,
                    "chips_lower_bound": plan.chips_lower_bound,
                    "ratio": round(ratio, 4),
                    "tensor_parallel": plan.tensor_parallel,
                    "stages": plan.pipeline_stages,
                    "explained": ratio <= 1.05
                    or any("cannot be cut" in note for note in plan.notes),
                }
            )

    topo = preset_topology(145, "groq-rack")
    plan = make_plan(request("llama-3.1-405b"), topo)
    picks = [
        plan.stages[i]
        for i in (0, len(plan.stages) // 4, len(plan.stages) // 2, len(plan.stages) - 1)
    ]
    replan_samples, full_samples = [], []
    for stage in picks:
        chip = stage.chips[0]
        seconds, result, _ = timed(lambda c=chip: replan_failed(plan, topo, [c]), args.repeats)
        replan_samples.append(seconds)
        failed_topo = topo.with_states({topo.parse_chip(chip): ChipState.FAILED})
        full, _, _ = timed(
            lambda t=failed_topo: make_plan(request("llama-3.1-405b"), t), max(1, args.repeats // 2)
        )
        full_samples.append(full)
        moved = result.moves[0]  # type: ignore[union-attr]
        print(
            f"re-plan after {chip} failed: {seconds * 1e3:.2f} ms "
            f"(moved stage {moved.stage} -> {', '.join(moved.to_chips)}); "
            f"full plan from scratch {full * 1e3:.1f} ms"
        )
    replan_ms = statistics.median(replan_samples) * 1e3
    full_ms = statistics.median(full_samples) * 1e3
    presets = preset_sweep()
    presets_over = [r for r in presets if r["ratio"] > 1.03]
    presets_ok = all(r["chips_used"] <= r["chips_target"] for r in presets)

    fitting = [r for r in rows if r["fits"]]
    worst = max(fitting, key=lambda r: r["ratio"])
    plan_405 = next(r for r in rows if r["model"] == "llama-3.1-405b" and r["racks"] == 145)
    summary = {
        "bench": "placement",
        "plan_seconds_405b_145_racks": round(plan_405["plan_seconds"], 4),
        "plan_cpu_seconds_min_405b_145_racks": round(plan_405["plan_cpu_seconds_min"], 4),
        "replan_ms": round(replan_ms, 3),
        "full_replan_baseline_ms": round(full_ms, 2),
        "replan_speedup_vs_full_plan": round(full_ms / replan_ms, 1),
        "max_chips_over_lower_bound": worst["ratio"],
        "max_ratio_case": f"{worst['model']} on {worst['racks']} racks",
        "max_ratio_explained": worst["explained"],
        "within_3_percent": worst["ratio"] <= 1.03,
        "max_plan_seconds": round(max(r["plan_seconds"] for r in rows), 4),
        "presets_planned": len(presets),
        "presets_within_3_percent": len(presets) - len(presets_over),
        "presets_over_3_percent": presets_over,
        "presets_within_target": presets_ok,
        "targets_met": bool(
            plan_405["plan_seconds"] < 1.0
            and replan_ms < 10.0
            and all(r["explained"] for r in fitting)
            and presets_ok
        ),
        "repeats": args.repeats,
        "racks": list(args.racks),
        "cases": rows,
    }
    print(
        f"405B on 145 racks planned in {plan_405['plan_seconds']:.3f} s (target < 1 s); "
        f"re-plan {replan_ms:.2f} ms (target < 10 ms, {full_ms / replan_ms:.0f}x faster than "
        f"planning from scratch); worst chips/lower bound {worst['ratio']:.3f}; "
        f"{len(presets) - len(presets_over)} of {len(presets)} preset cases within x1.03, "
        + ("the rest within their chipsTarget" if presets_ok else "SOME OVER THEIR chipsTarget")
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
