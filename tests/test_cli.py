"""`lpuctl plan` end to end: exit codes, output shapes, topology files, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from orchestrator.cli import main

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "manifests" / "examples"
TINY = EXAMPLES / "tiny-llama.yaml"
BAD_FILES = sorted((ROOT / "tests" / "data" / "specs" / "bad").glob("*.yaml"))


def lpuctl(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real command in its own process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_plan_json_has_the_promised_fields(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", "-f", str(TINY), "-o", "json")
    assert code == 0, err
    plan = json.loads(out)
    for key in (
        "replicas",
        "tensorParallel",
        "pipelineStages",
        "chipsUsed",
        "chipsLowerBound",
        "chipsTarget",
        "spares",
        "predicted",
        "planSeconds",
        "stages",
    ):
        assert key in plan
    assert set(plan["predicted"]) >= {
        "latencyMsPerToken",
        "tokensPerSecondPerUser",
        "tokensPerSecond",
    }
    stage = plan["stages"][0]
    assert set(stage) >= {
        "replica",
        "index",
        "ops",
        "chips",
        "sramBytesPerChip",
        "sramCapacityBytes",
    }
    assert stage["chips"][0].count("/") == 2 and stage["chips"][0].startswith("rack-")
    assert plan["chipsUsed"] == sum(len(s["chips"]) for s in plan["stages"])
    assert plan["chipsLowerBound"] <= plan["chipsUsed"] <= plan["chipsTarget"]


def _preset_deployment(tmp_path: Path, preset: str, batch: int) -> Path:
    """The 70B example with another preset, one replica, `batch` and no spares."""
    text = (EXAMPLES / "llama3-70b.yaml").read_text(encoding="utf-8")
    for old, new in (
        ("preset: llama-3-70b", f"preset: {preset}"),
        ("replicas: 2", "replicas: 1"),
        ("maxBatch: 8", f"maxBatch: {batch}"),
        ("sparesPerRack: 1", "sparesPerRack: 0"),
    ):
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / f"{preset}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("preset", "batch", "racks", "used", "bound", "target", "ratio"),
    [
        # The one preset where one chip is more than 3 % of the bound: the target is the
        # fewest chips any split of the finest pieces needs (22), not floor(1.03 x 21) = 21.
        ("llama-3.2-3b", 4, 1, 22, 21, 22, "1.048"),
        # A normal one: the target is floor(1.03 x 91) = 93.
        ("llama-2-13b", 4, 2, 92, 91, 93, "1.011"),
    ],
)
def test_plan_shows_chips_used_lower_bound_and_target(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    preset: str,
    batch: int,
    racks: int,
    used: int,
    bound: int,
    target: int,
    ratio: str,
) -> None:
    """Table, JSON, YAML and the SVG rack map's header all give chips used, the SRAM lower
    bound and `chipsTarget`."""
    path, svg = _preset_deployment(tmp_path, preset, batch), tmp_path / "map.svg"
    code, out, err = run(capsys, "plan", "-f", str(path), "--racks", str(racks), "--svg", str(svg))
    assert code == 0, err
    assert (
        f"= {used} chips; 0 spare chips\n  chips used / lower bound / target: "
        f"{used} / {bound} / {target} (x{ratio} of the bound, within the target)\n"
    ) in out
    header = "".join(ET.parse(svg).getroot().itertext())
    assert f"{used} chips used vs lower bound {bound} (+" in header
    assert f"and target {target} · 0 spares" in header
    for fmt, load in (("json", json.loads), ("yaml", yaml.safe_load)):
        code, out, err = run(capsys, "plan", "-f", str(path), "--racks", str(racks), "-o", fmt)
        assert code == 0, err
        plan = load(out)
        assert (plan["chipsUsed"], plan["chipsLowerBound"], plan["chipsTarget"]) == (
            used,
            bound,
            target,
        )


def test_plan_yaml_equals_json(capsys: pytest.CaptureFixture[str]) -> None:
    _, as_json, _ = run(capsys, "plan", "-f", str(TINY), "-o", "json")
    _, as_yaml, _ = run(capsys, "plan", "-f", str(TINY), "-o", "yaml")
    a, b = json.loads(as_json), yaml.safe_load(as_yaml)
    a.pop("planSeconds"), b.pop("planSeconds")
    assert a == b


def test_table_explains_plan_and_draws_map(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plan", "-f", str(TINY))
    assert code == 0
    assert "lower bound" in out and "tokens/s per user" in out
    assert "layers.0." in out and "rack-0/node-0/chip-0" in out
    assert "Rack map" in out and " S  S" in out


def test_topology_file_and_svg(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    svg = tmp_path / "map.svg"
    code, out, err = run(
        capsys,
        "plan",
        "-f",
        str(TINY),
        "--topology",
        str(EXAMPLES / "topology-dev.yaml"),
        "-o",
        "json",
        "--svg",
        str(svg),
    )
    assert code == 0, err
    plan = json.loads(out)
    chips = {c for s in plan["stages"] for c in s["chips"]}
    assert "rack-0/node-0/chip-3" not in chips  # failed in the topology file
    assert not any(c.startswith("rack-1/node-1/") for c in chips)  # cordoned node
    root = ET.fromstring(svg.read_text())
    assert root.tag.endswith("svg")


def test_real_process_exit_codes() -> None:
    fits = lpuctl("plan", "-f", str(TINY), "-o", "json")
    assert fits.returncode == 0 and json.loads(fits.stdout)["replicas"] == 2
    too_big = lpuctl("plan", "-f", str(EXAMPLES / "llama3-70b.yaml"), "--racks", "8")
    assert too_big.returncode == 1
    assert "needs 706 chips" in too_big.stderr and "free in 8 racks" in too_big.stderr
    bad = lpuctl("plan", "-f", str(BAD_FILES[0]))
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert str(BAD_FILES[0]) in bad.stderr


@pytest.mark.parametrize("path", BAD_FILES, ids=lambda p: p.stem)
def test_bad_files_exit_2_naming_the_file(path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "plan", "-f", str(path))
    assert code == 2 and out == ""
    assert str(path) in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["plan"], "the following arguments are required: -f"),
        (["plan", "-f", "nope.yaml"], "nope.yaml: file not found"),
        (["plan", "-f", str(TINY), "--racks", "0"], "must be from 1 to 4096"),
        (["plan", "-f", str(TINY), "--racks", "two"], "must be a whole number"),
        (["plan", "-f", str(TINY), "--profile", "h100"], "invalid choice: 'h100'"),
        (["plan", "-f", str(TINY), "-o", "xml"], "invalid choice: 'xml'"),
        (["plan", "-f", str(TINY), "--racks", "2", "--topology", "t.yaml"], "not allowed with"),
        (["plan", "-f", str(TINY), "--topology", "missing.yaml"], "missing.yaml: file not found"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_flags_exit_2(
    args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, *args)
    assert code == 2
    assert fragment in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("profile: dev\nracks: 2\nracks: 3\n", ":3: racks: duplicate key"),
        ("profile: dev\nrack: 2\n", ":2: rack: unknown field 'rack'"),
        ("profile: dev\nracks: [{name: a, nodes: 0}]\n", "racks[0].nodes: must be a whole"),
        ("profile: dev\nracks: 1\nchips:\n  rack-0/node-7: failed\n", ":4: chips["),
        ("profile: dev\nracks: 1\nchips:\n  foo: failed\n", ":4: chips.foo: 'foo' is not a chip"),
        ("profile: dev\nracks: 1\nchips: {rack-0/node-0/chip-1: melted}\n", "state must be"),
        ("profile: &p dev\nracks: *p\n", "aliases/anchors are not allowed"),
        ("profile: !!python/name:os.system dev\nracks: 1\n", "is not allowed"),
        ("- profile\n", "top level must be a mapping (profile, racks, chips)"),
        ("", "file is empty; expected a Topology"),
        ("profile: {base: groq-rack, sram_bytes: .inf}\nracks: 1\n", "non-finite"),
    ],
)
def test_bad_topology_files_exit_2(
    text: str, fragment: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    topo = tmp_path / "topo.yaml"
    topo.write_text(text)
    code, _, err = run(capsys, "plan", "-f", str(TINY), "--topology", str(topo))
    assert code == 2, err
    assert str(topo) in err and fragment in err and "Traceback" not in err


def test_unwritable_svg_is_an_input_error(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run(
        capsys, "plan", "-f", str(TINY), "--svg", str(tmp_path / "no" / "such" / "dir.svg")
    )
    assert code == 2 and "cannot write SVG" in err


def test_hugging_face_config_deployment(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model_dir = tmp_path / "my-llama"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "vocab_size": 4096,
                "hidden_size": 256,
                "intermediate_size": 704,
                "num_hidden_layers": 8,
                "num_attention_heads": 8,
                "num_key_value_heads": 4,
                "max_position_embeddings": 1024,
            }
        )
    )
    deployment = tmp_path / "d.yaml"
    deployment.write_text(
        "apiVersion: lpu.lockstep.dev/v1alpha1\nkind: LPUDeployment\nmetadata: {name: hf}\n"
        "spec:\n  model: {config: my-llama/config.json}\n  serving: {maxContext: 256}\n"
    )
    code, out, err = run(capsys, "plan", "-f", str(deployment), "-o", "json")
    assert code == 0, err
    plan = json.loads(out)
    assert plan["model"] == "my-llama" and plan["chipsUsed"] >= plan["chipsLowerBound"]


def test_agent_subcommand_runs_the_agent_entry_point_by_name() -> None:
    """`lpuctl agent` hands its flags to `agents.main` (imported only then): the agent's own
    help and flag errors, and `lpuctl plan` never loads the agent, gRPC or BLAS pinning."""
    helped = lpuctl("agent", "--help")
    assert helped.returncode == 0 and "--node" in helped.stdout and "--sram-bytes" in helped.stdout
    bad = lpuctl("agent", "--node", "x", "--chips", "0")
    assert bad.returncode == 2 and "--chips" in bad.stderr and "Traceback" not in bad.stderr
    listed = lpuctl("--help")
    assert "agent" in listed.stdout
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, os; from orchestrator.cli import main; main(['plan', '-f', sys.argv[1]]);"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('agents', 'grpc'));"
            "print(bad, os.environ.get('OPENBLAS_NUM_THREADS'))",
            str(TINY),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
        # Other tests import agents.main in this process, which pins BLAS in os.environ.
        env={k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"},
    )
    assert probe.stdout.strip().endswith("[] None"), probe.stdout[-300:]


def test_client_commands_import_neither_the_control_plane_nor_the_planner() -> None:
    """`lpuctl get nodes` runs as a fresh process per call: its imports are most of its time.
    A client command needs gRPC and the state directory's layout, not the store, the
    controller, the planner (numpy), the spec's JSON schema or the certificate authority."""
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from orchestrator.cli import main;"
            "code = main(['get', 'nodes', '--server', '127.0.0.1:1', '--ca', sys.argv[1]]);"
            "heavy = ('numpy', 'jsonschema', 'cryptography', 'orchestrator.store',"
            " 'orchestrator.controller', 'orchestrator.control_plane', 'placement.planner');"
            "print(code, sorted(m for m in heavy if m in sys.modules))",
            str(TINY),  # not a CA: the command fails, after its imports
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    assert probe.stdout.strip().endswith("1 []"), probe.stdout[-300:] + probe.stderr[-300:]
