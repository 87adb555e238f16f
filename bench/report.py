"""The benchmark report: run the benchmarks, keep their results as JSON, plot them as PNGs.

Every benchmark ends with one JSON line. `run` executes the benchmarks behind the report's
figures (or the ones named), each as `python -m bench.NAME ...` in a child process with its
output passed through, and saves that last line under `docs/data/NAME.json` together with
what makes a figure checkable: the exact command, the UTC start and end, the load average
before and after (the machine is shared: a figure without its load is not comparable) and the
commit. `plot` reads `docs/data/*.json` and writes the PNGs under `docs/`; each PNG's footer
repeats the command, date and load of its data. `save NAME -- CMD ...` runs any command and
saves its last JSON line the same way (e.g. a new mode of a benchmark that prints
`{"cpu_vs_nodes": [[nodes, cores], ...]}`, saved as `control_plane_cpu`).

Figures and the data sets they read:

* `plan_time.png` — `placement` (`bench.placement --racks 1,2,...,145`): plan time (wall-clock
  median and least CPU time) against cluster size, one line per model; hollow markers where
  the model does not fit (the planner still searched before saying so).
* `failover_phases.png` — `failover` and `failover_stage0` (`bench.failover [--stage0]`): the
  p50 of each phase (detect, re-plan, load, resync, replay) stacked per scenario, with the
  p50 of kill -> Ready again and its min-max.
* `shard_load_chunks.png` — `shard_load_chunks` (`bench.shard_load --chunk-sweep`): load +
  verify + commit GB/s against chunk size, mutual TLS and plaintext, and their CPU per GB.
* `control_plane_cpu.png` — `control_plane_cpu`: control-plane CPU (cores) against node
  count, from a result holding `"cpu_vs_nodes": [[nodes, cores], ...]` (optionally
  `"idle_vs_nodes"` of the same shape: the CPU with every stream open and no beats). `run`
  takes it from `bench.control_plane --only scale` (the whole control-plane process, in its
  own process, every node beating once a second, nodes added in steps up to 1,305).

Run: `make report`, or `.venv/bin/python -m bench.report run [NAME ...] [--no-plot]`,
`.venv/bin/python -m bench.report plot`, `.venv/bin/python -m bench.report save NAME -- CMD`.
matplotlib comes with the `report` extra (and with `dev`).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "docs" / "data"
OUT = ROOT / "docs"


class ReportError(Exception):
    """A data file that is missing, unreadable or of the wrong shape: the message names it."""


# --- running the benchmarks -------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One saved data set: the benchmark module and its arguments."""

    module: str
    args: tuple[str, ...] = ()
    figure: bool = False  # behind one of the PNGs (run by default)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]


JOBS: dict[str, Job] = {
    "placement": Job(
        "bench.placement", ("--racks", "1,2,4,8,16,36,72,145", "--repeats", "3"), True
    ),
    "failover": Job("bench.failover", ("--runs", "3"), True),
    "failover_stage0": Job("bench.failover", ("--stage0", "--runs", "3"), True),
    "shard_load_chunks": Job("bench.shard_load", ("--chunk-sweep", "--reps", "3"), True),
    # control_plane_cpu: `bench.control_plane --only scale`, see `run_control_plane_cpu`
    "shard_load": Job("bench.shard_load"),
    "lockstep": Job("bench.lockstep"),
    "executor": Job("bench.executor"),
    "control_plane": Job("bench.control_plane", ("--skip-ray",)),
    "verify": Job("bench.verify", ("--reps", "30")),
    "ray_engine": Job("bench.ray_engine"),
    "scale": Job("bench.scale"),  # issue 12: the simulated fleet at 1,305 nodes
}
FIGURE_DATA = (*(n for n, j in JOBS.items() if j.figure), "control_plane_cpu")


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


def last_json_line(output: str, what: str) -> dict[str, Any]:
    """The last line of `output` that parses as a JSON object (a benchmark's result)."""
    for line in reversed(output.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ReportError(f"{what}: no JSON object on any line of its output")


def execute(argv: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run one benchmark command from the repository root, its output passed through; its
    result (last JSON line) and the run's facts (command, UTC times, load, commit)."""
    shown = " ".join(shlex.quote(a) for a in [".venv/bin/python", *argv[1:]])
    print(f"$ {shown}", flush=True)
    before, started = load_average(), time.time()
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    except OSError as exc:
        raise ReportError(f"{shown}: cannot start: {exc}") from None
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        lines.append(line)
    if proc.wait() != 0:
        raise ReportError(f"{shown}: exit status {proc.returncode}")
    facts = {
        "command": shown,
        "started_utc": _utc(started),
        "seconds": round(time.time() - started, 1),
        "load_before": before,
        "load_after": load_average(),
        "cpus": os.cpu_count(),
        "commit": _commit(),
    }
    return last_json_line("".join(lines), shown), facts


def save(name: str, facts: dict[str, Any], result: dict[str, Any], data: Path = DATA) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    path = data / f"{name}.json"
    path.write_text(json.dumps({"name": name, **facts, "result": result}, indent=1) + "\n")
    print(f"saved {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return path


def run_control_plane_cpu() -> tuple[dict[str, Any], dict[str, Any]]:
    """Control-plane CPU at several node counts: `bench.control_plane --only scale`, the whole
    control plane in its own process with every node beating once a second (its JSON carries
    `cpu_vs_nodes`)."""
    result, facts = execute([sys.executable, "-m", "bench.control_plane", "--only", "scale"])
    return result, facts


# --- plotting ---------------------------------------------------------------------------------


def read(name: str, data: Path = DATA) -> dict[str, Any]:
    path = data / f"{name}.json"
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (python -m bench.report run {name})") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable as JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get("result"), dict):
        raise ReportError(f"{path}: expected an object with a 'result' object")
    return record


def _footer(records: Sequence[dict[str, Any]]) -> str:
    lines = []
    for r in records:
        before, after = r.get("load_before"), r.get("load_after")
        load_text = (
            f"load avg (1 min) {before[0]} -> {after[0]} on {r.get('cpus', '?')} CPUs"
            if isinstance(before, list) and before and isinstance(after, list) and after
            else "load not recorded"
        )
        lines.append(f"{r.get('command', '?')}\n{r.get('started_utc', '?')} UTC, {load_text}")
    return "\n".join(lines)


def _figure(
    plt: Any, records: Sequence[dict[str, Any]], ncols: int = 1, right: float = 0.97
) -> tuple[Any, Any]:
    """A figure of `ncols` axes, the data's command, date and load as its footer; `right`
    leaves room for a legend outside the axes."""
    footer = _footer(records)
    rows = footer.count("\n") + 1
    fig, axes = plt.subplots(1, ncols, figsize=(10, 5.6))
    fig.text(0.01, 0.01, footer, fontsize=7, family="monospace", va="bottom", color="0.3")
    fig.subplots_adjust(bottom=0.14 + 0.026 * rows, top=0.84, right=right, wspace=0.3)
    return fig, axes


def _need(result: dict[str, Any], key: str, name: str) -> Any:
    if key not in result:
        raise ReportError(f"{name}: result has no {key!r}")
    return result[key]


def plot_plan_time(plt: Any, data: Path, out: Path) -> Path:
    record = read("placement", data)
    cases = _need(record["result"], "cases", "placement")
    fig, ax = _figure(plt, [record], right=0.72)
    models = sorted({c["model"] for c in cases}, key=lambda m: [c["model"] for c in cases].index(m))
    for i, model in enumerate(models):
        rows = sorted((c for c in cases if c["model"] == model), key=lambda c: c["racks"])
        color = f"C{i}"
        chips = [c["racks"] * 72 for c in rows]
        ax.plot(chips, [c["plan_seconds"] * 1e3 for c in rows], "-", color=color, label=model)
        ax.plot(chips, [c["plan_cpu_seconds_min"] * 1e3 for c in rows], "--", color=color)
        for c, x in zip(rows, chips, strict=True):
            face = color if c["fits"] else "white"
            ax.plot([x], [c["plan_seconds"] * 1e3], "o", color=color, mfc=face, ms=5)
    ax.plot([], [], "k-", label="wall clock (median)")
    ax.plot([], [], "k--", label="CPU time (least)")
    ax.plot([], [], "ko", mfc="white", label="does not fit (searched, refused)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("cluster size, chips (groq-rack: 72 chips per rack)")
    ax.set_ylabel("plan time, ms")
    racks = sorted({c["racks"] for c in cases})
    top = ax.secondary_xaxis("top", functions=(lambda x: x / 72, lambda r: r * 72))
    top.set_xticks(racks, [str(r) for r in racks])
    top.set_xlabel("racks")
    ax.grid(True, which="major", alpha=0.3)
    ax.yaxis.set_major_formatter(_plain)
    ax.xaxis.set_major_formatter(_plain)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Plan time against cluster size (int8, 4k context, batch 8, 1 replica)")
    return _save(plt, fig, out / "plan_time.png")


def _plain(value: float, _pos: int) -> str:
    """Tick labels of log axes as plain numbers (100, not 10^2)."""
    return f"{value:,.10g}"


PHASES = ("detect", "replan", "load", "resync", "replay")


def plot_failover(plt: Any, data: Path, out: Path) -> Path:
    records = [read(n, data) for n in ("failover", "failover_stage0")]
    fig, ax = _figure(plt, records, right=0.7)
    labels = []
    for x, record in enumerate(records):
        r = record["result"]
        seconds = _need(r, "seconds", record["name"])
        labels.append(f"{r.get('kill', record['name'])}\n({r.get('runs', '?')} runs)")
        bottom = 0.0
        for i, phase in enumerate(PHASES):
            value = (seconds.get(phase) or {}).get("p50", 0.0)
            ax.bar(x, value, 0.5, bottom=bottom, color=f"C{i}", label=phase if x == 0 else None)
            if value >= 0.03:
                ax.text(x, bottom + value / 2, f"{value:.3f}", ha="center", va="center", fontsize=7)
            bottom += value
        ready = seconds.get("ready_again")
        if ready:
            ax.errorbar(
                x + 0.33,
                ready["p50"],
                yerr=[[ready["p50"] - ready["min"]], [ready["max"] - ready["p50"]]],
                fmt="kD",
                ms=5,
                capsize=3,
                label="kill -> Ready again, p50 (min-max)" if x == 0 else None,
            )
    target = records[0]["result"].get("targets", {}).get("ready_again_p50_s")
    if target:
        ax.axhline(target, color="red", lw=0.8, ls=":", label=f"target {target} s")
    ax.set_xticks(range(len(records)), labels)
    ax.set_xlim(-0.6, len(records) - 0.2)
    ax.set_ylabel("seconds from the SIGKILL (p50 of each phase)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Failover of tiny-llama after SIGKILL of one agent, by phase")
    return _save(plt, fig, out / "failover_phases.png")


def plot_shard_chunks(plt: Any, data: Path, out: Path) -> Path:
    record = read("shard_load_chunks", data)
    rows = _need(record["result"], "chunk_sweep", "shard_load_chunks")
    fig, (rate, cost) = _figure(plt, [record], ncols=2)
    kib = [r["chunk_kib"] for r in rows]
    for key, label, color in (("tls", "mutual TLS", "C0"), ("plaintext", "plaintext", "C1")):
        rate.plot(kib, [r[f"{key}_gbps"] for r in rows], "o-", color=color, label=label)
        cost.plot(kib, [r[f"{key}_core_s_per_gb"] for r in rows], "o-", color=color, label=label)
    default = record["result"].get("default_chunk_kib")
    for ax in (rate, cost):
        ax.set_xscale("log", base=2)
        ax.set_xticks(kib, [f"{k // 1024} MiB" if k >= 1024 else f"{k} KiB" for k in kib])
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.set_xlabel("chunk size")
        ax.grid(True, alpha=0.3)
        if default:
            ax.axvline(default, color="0.5", lw=0.8, ls=":", label="default chunk")
        ax.legend(fontsize=8)
    rate.set_ylabel("GB/s, load + BLAKE3 verify + commit (median)")
    rate.set_ylim(bottom=0)
    cost.set_ylabel("CPU, core-seconds per GB (sender + agent)")
    cost.set_ylim(bottom=0)
    shard = record["result"].get("shard_mib", "?")
    fig.suptitle(f"Shard load into one agent against chunk size ({shard} MiB shard)")
    return _save(plt, fig, out / "shard_load_chunks.png")


def plot_control_plane_cpu(plt: Any, data: Path, out: Path) -> Path:
    record = read("control_plane_cpu", data)
    result = record["result"]
    points = _need(result, "cpu_vs_nodes", "control_plane_cpu")
    try:
        pairs = sorted((int(n), float(c)) for n, c in points)
    except (TypeError, ValueError):
        raise ReportError("control_plane_cpu: cpu_vs_nodes must be [[nodes, cores], ...]") from None
    if not pairs:
        raise ReportError("control_plane_cpu: cpu_vs_nodes is empty")
    fig, ax = _figure(plt, [record], right=0.7)
    interval = result.get("interval_s")
    beat = f", a beat every {interval} s" if interval else ""
    ax.plot(*zip(*pairs, strict=True), "o-", color="C0", label=f"heartbeating{beat}")
    idle = result.get("idle_vs_nodes")
    if idle:
        ax.plot(*zip(*sorted(idle), strict=True), "s--", color="C2", label="streams open, no beats")
    ax.axhline(
        0.5,
        color="red",
        lw=0.8,
        ls=":",
        label="issue 12: < 0.5 core\nat 1,305 nodes, 1 beat/s",
    )
    ax.axvline(1305, color="0.5", lw=0.8, ls=":")
    ax.set_xlabel("nodes (1,305 = 145 racks x 9 nodes, 10,440 chips)")
    ax.set_ylabel("control-plane CPU, cores")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Control-plane CPU against node count")
    return _save(plt, fig, out / "control_plane_cpu.png")


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})  # no version: stable bytes
    plt.close(fig)
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}", flush=True)
    return path


PLOTS: dict[str, Callable[[Any, Path, Path], Path]] = {
    "plan_time": plot_plan_time,
    "failover_phases": plot_failover,
    "shard_load_chunks": plot_shard_chunks,
    "control_plane_cpu": plot_control_plane_cpu,
}


def plot_all(data: Path = DATA, out: Path = OUT) -> tuple[list[Path], list[str]]:
    """Every figure whose data is there: (PNGs written, one message per figure not drawn)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written, skipped = [], []
    for name, plot in PLOTS.items():
        try:
            written.append(plot(plt, data, out))
        except ReportError as exc:
            skipped.append(f"{name}.png not drawn: {exc}")
            plt.close("all")
    return written, skipped


# --- command line -----------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run benchmarks, save docs/data/NAME.json, then plot")
    run.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"data sets (default: the figures' {', '.join(FIGURE_DATA)}); "
        f"also {', '.join(n for n, j in JOBS.items() if not j.figure)}",
    )
    run.add_argument("--no-plot", action="store_true")
    plot = sub.add_parser("plot", help="the PNGs from the saved JSON")
    for p in (run, plot):
        p.add_argument("--data", type=Path, default=DATA, help="JSON folder (docs/data)")
        p.add_argument("--out", type=Path, default=OUT, help="PNG folder (docs)")
    keep = sub.add_parser("save", help="save the last JSON line of CMD as docs/data/NAME.json")
    keep.add_argument("name")
    keep.add_argument("--data", type=Path, default=DATA)
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.command == "save" and not cmd:
        parser.error("save: give the command after --, e.g. save NAME -- python -m bench.x")

    try:
        if args.command == "save":
            if cmd[0] in ("python", "python3", ".venv/bin/python"):
                cmd = [sys.executable, *cmd[1:]]
            result, facts = execute(cmd)
            save(args.name, facts, result, args.data)
            return 0
        if args.command == "run":
            known = (*JOBS, "control_plane_cpu")
            unknown = [n for n in args.names if n not in known]
            if unknown:
                parser.error(f"unknown data set(s) {unknown}; known: {', '.join(known)}")
            for name in args.names or FIGURE_DATA:
                if name == "control_plane_cpu":
                    result, facts = run_control_plane_cpu()
                else:
                    result, facts = execute(JOBS[name].argv())
                save(name, facts, result, args.data)
            if args.no_plot:
                return 0
        _written, skipped = plot_all(args.data, args.out)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for message in skipped:
        print(message, file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
