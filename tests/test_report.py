"""bench/report.py: the PNGs from sample benchmark JSON, the runner's saved records, bad data.

matplotlib is a dev dependency (and the `report` extra), so these run with the suite."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
FACTS = {
    "command": ".venv/bin/python -m bench.sample",
    "started_utc": "2026-11-29 23:30:00",
    "seconds": 1.0,
    "load_before": [1.5, 1.2, 1.0],
    "load_after": [1.8, 1.3, 1.0],
    "cpus": 2,
    "commit": "abc1234",
}


def _placement() -> dict[str, Any]:
    cases = []
    for model, base in (("llama-3-8b", 0.002), ("llama-3.1-405b", 0.1)):
        for racks in (1, 8, 145):
            fits = racks >= 8 or model == "llama-3-8b"
            cases.append(
                {
                    "model": model,
                    "racks": racks,
                    "plan_seconds": base * (1 + racks / 1000),
                    "plan_cpu_seconds_min": base,
                    "fits": fits,
                }
            )
    return {"bench": "placement", "cases": cases}


def _failover(kill: str) -> dict[str, Any]:
    phase = {"p50": 0.1, "min": 0.05, "max": 0.2}
    return {
        "bench": "failover",
        "kill": kill,
        "runs": 3,
        "seconds": {
            **{k: dict(phase) for k in report.PHASES},
            "ready_again": {"p50": 0.5, "min": 0.4, "max": 0.7},
        },
        "targets": {"detect_p50_s": 0.5, "ready_again_p50_s": 2.0},
    }


def _chunks() -> dict[str, Any]:
    rows = [
        {
            "chunk_kib": kib,
            "tls_gbps": 0.5 + i / 10,
            "plaintext_gbps": 0.8 + i / 10,
            "tls_core_s_per_gb": 2.0 - i / 10,
            "plaintext_core_s_per_gb": 1.2 - i / 20,
        }
        for i, kib in enumerate((64, 256, 1024, 8192))
    ]
    return {
        "bench": "shard_load",
        "shard_mib": 256.0,
        "default_chunk_kib": 1024,
        "chunk_sweep": rows,
    }


SAMPLES = {
    "placement": _placement(),
    "failover": _failover("a node without stage 0"),
    "failover_stage0": _failover("stage-0 node"),
    "shard_load_chunks": _chunks(),
    # the documented shape other benchmarks may print: {"cpu_vs_nodes": [[nodes, cores], ...]}
    "control_plane_cpu": {"cpu_vs_nodes": [[1305, 0.6], [163, 0.1], [652, 0.3]]},
}


def _write(data: Path, samples: dict[str, dict[str, Any]]) -> None:
    data.mkdir(parents=True, exist_ok=True)
    for name, result in samples.items():
        (data / f"{name}.json").write_text(json.dumps({"name": name, **FACTS, "result": result}))


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(raw[16:20], "big"), int.from_bytes(raw[20:24], "big")


def test_every_figure_is_drawn_from_sample_json(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "docs"
    _write(data, SAMPLES)
    written, skipped = report.plot_all(data, out)
    assert skipped == []
    assert sorted(p.name for p in written) == sorted(f"{n}.png" for n in report.PLOTS)
    for path in written:
        width, height = _png_size(path)
        assert width > 500 and height > 300, (path, width, height)
    # same data, same bytes: no date or version in the files, so a re-plot is not a change
    first = {p.name: p.read_bytes() for p in written}
    report.plot_all(data, out)
    assert {p.name: p.read_bytes() for p in written} == first


def test_missing_and_malformed_data_are_named_and_the_others_still_drawn(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "docs"
    samples = dict(SAMPLES)
    del samples["failover_stage0"]
    samples["control_plane_cpu"] = {"cpu_vs_nodes": [[1305, "lots"]]}
    _write(data, samples)
    (data / "shard_load_chunks.json").write_text("{not json")
    written, skipped = report.plot_all(data, out)
    assert [p.name for p in written] == ["plan_time.png"]
    text = "\n".join(skipped)
    assert "failover_stage0.json: missing" in text
    assert "shard_load_chunks.json: not readable as JSON" in text
    assert "cpu_vs_nodes must be [[nodes, cores], ...]" in text
    assert report.main(["plot", "--data", str(data), "--out", str(out)]) == 1


def test_save_keeps_the_last_json_line_with_command_time_and_load(tmp_path: Path) -> None:
    script = 'print("figures"); print(\'{"bench": "x", "cpu_vs_nodes": [[10, 0.1]]}\')'
    code = report.main(
        ["save", "control_plane_cpu", "--data", str(tmp_path), "--", "python", "-c", script]
    )
    assert code == 0
    record = json.loads((tmp_path / "control_plane_cpu.json").read_text())
    assert record["result"] == {"bench": "x", "cpu_vs_nodes": [[10, 0.1]]}
    assert record["command"].startswith(".venv/bin/python -c ")
    assert len(record["load_before"]) == 3 and len(record["load_after"]) == 3
    assert record["cpus"] and record["started_utc"][:2] == "20"


def test_a_command_without_json_or_failing_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(report.ReportError, match="no JSON object"):
        report.last_json_line("figures only\n{broken\n", "bench.x")
    assert (
        report.main(["save", "x", "--data", str(tmp_path), "--", sys.executable, "-c", "print(1)"])
        == 1
    )
    assert (
        report.main(
            ["save", "x", "--data", str(tmp_path), "--", "python", "-c", "raise SystemExit(3)"]
        )
        == 1
    )
    assert not (tmp_path / "x.json").exists()


def test_the_sweeps_options_refuse_bad_values_naming_the_option() -> None:
    import argparse

    from bench.placement import SWEEP_RACKS, rack_list
    from bench.shard_load import SWEEP_KIB, kib_list

    assert rack_list(",".join(map(str, SWEEP_RACKS))) == SWEEP_RACKS
    assert kib_list("1024,64") == (64, 1024) and SWEEP_KIB[-1] == 8192
    for bad in ("1,x", "0,145", "1,8"):  # 145 must be there: the summary's 405B figure
        with pytest.raises(argparse.ArgumentTypeError, match="--racks"):
            rack_list(bad)
    for bad in ("64,big", "0", "16384"):  # an agent takes chunks up to 8 MiB
        with pytest.raises(argparse.ArgumentTypeError):
            kib_list(bad)
