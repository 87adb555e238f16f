"""The SVG rack map: well-formed, one square per chip, the right style for every state.

The map is read back with `xml.etree` (the way a browser would see it) rather than compared to
a golden file, so layout tweaks do not break the tests but a wrong colour or a lost chip does.
"""

from __future__ import annotations

import colorsys
import dataclasses
import xml.etree.ElementTree as ET

import pytest

from orchestrator.rackmap import (
    CORDONED_FILL,
    FAILED_FILL,
    FREE_FILL,
    SPARE_FILL,
    USED_FILL,
    render_rack_map,
)
from orchestrator.render import chips_line
from placement.errors import InputError
from placement.models import model_preset
from placement.plan import Plan
from placement.planner import PlanRequest, make_plan
from placement.topology import ChipRef, ChipState, Topology, preset_topology

NS = "{http://www.w3.org/2000/svg}"


@pytest.fixture(scope="module")
def small() -> tuple[Plan, Topology]:
    """The dev example: 2 racks x 3 nodes x 8 chips, tiny-llama over 2 replicas."""
    topo = preset_topology(2, "dev")
    plan = make_plan(PlanRequest("demo", model_preset("tiny-llama"), "fp16", 2, 256, 4), topo)
    return plan, topo


@pytest.fixture(scope="module")
def big() -> tuple[Plan, Topology]:
    """The largest published system: 145 racks, 10,440 chips, one 405B replica."""
    topo = preset_topology(145, "groq-rack")
    plan = make_plan(PlanRequest("big", model_preset("llama-3.1-405b"), "int8", 1, 4096, 8), topo)
    return plan, topo


def _parse(svg: str) -> ET.Element:
    return ET.fromstring(svg.encode("utf-8"))


def _chips(root: ET.Element) -> dict[str, ET.Element]:
    chips: dict[str, ET.Element] = {}
    for rect in root.iter(f"{NS}rect"):
        chip = rect.get("data-chip")
        if chip is not None:
            assert chip not in chips, f"{chip} drawn twice"
            chips[chip] = rect
    return chips


def _title(rect: ET.Element) -> str:
    title = rect.find(f"{NS}title")
    assert title is not None and title.text
    return title.text


def _texts(root: ET.Element) -> str:
    return "\n".join("".join(t.itertext()) for t in root.iter(f"{NS}text"))


def _hls(fill: str) -> tuple[float, float, float]:
    assert fill.startswith("#") and len(fill) == 7, fill
    r, g, b = (int(fill[i : i + 2], 16) / 255 for i in (1, 3, 5))
    return colorsys.rgb_to_hls(r, g, b)


def _states_topology(topo: Topology) -> Topology:
    updates = {
        ChipRef(0, 0, 5): ChipState.FAILED,  # holds a stage of replica 0
        ChipRef(0, 1, 6): ChipState.USED,
        ChipRef(0, 1, 7): ChipState.SPARE,
    }
    updates.update({ref: ChipState.CORDONED for ref in topo.node_chips(1, 1)})
    return topo.with_states(updates)


def test_every_chip_once_with_the_fill_of_its_state(small: tuple[Plan, Topology]) -> None:
    plan, topo = small
    topo = _states_topology(topo)
    root = _parse(render_rack_map(plan, topo))
    chips = _chips(root)
    assert set(chips) == {
        topo.chip_id(r) for rack, node in topo.iter_nodes() for r in topo.node_chips(rack, node)
    }
    fill = {chip: rect.get("fill") for chip, rect in chips.items()}
    assert fill["rack-0/node-0/chip-5"] == FAILED_FILL
    assert fill["rack-1/node-1/chip-0"] == CORDONED_FILL
    assert fill["rack-0/node-1/chip-6"] == USED_FILL
    assert fill["rack-0/node-1/chip-7"] == SPARE_FILL  # a topology spare
    assert fill[plan.spares[0]] == SPARE_FILL  # a spare the plan reserved
    assert fill["rack-0/node-1/chip-5"] == FREE_FILL
    # The pattern behind the failed fill is red, the cordoned one grey.
    patterns = {p.get("id"): p for p in root.iter(f"{NS}pattern")}
    assert {"p-failed", "p-cordoned", "p-spare"} <= set(patterns)
    failed_bg = patterns["p-failed"].find(f"{NS}rect")
    assert failed_bg is not None and failed_bg.get("fill") == "#d62728"


def test_replicas_get_hues_and_stages_get_lighter(small: tuple[Plan, Topology]) -> None:
    plan, topo = small
    chips = _chips(_parse(render_rack_map(plan, topo)))
    r0 = plan.replica_stages(0)
    r1 = plan.replica_stages(1)
    h0, l0_first, _ = _hls(chips[r0[0].chips[0]].get("fill", ""))
    h1, l1_first, _ = _hls(chips[r1[0].chips[0]].get("fill", ""))
    assert abs(h0 - h1) * 360 > 60  # two clearly different hues
    assert l0_first == pytest.approx(l1_first, abs=0.02)  # same stage, same lightness
    lightness = [_hls(chips[s.chips[0]].get("fill", ""))[1] for s in r0]
    assert lightness == sorted(lightness) and lightness[-1] - lightness[0] > 0.4
    hues = {round(_hls(chips[s.chips[0]].get("fill", ""))[0] * 360) for s in r0}
    assert max(hues) - min(hues) <= 2  # one hue along the whole pipeline


def test_tooltips_name_chip_state_stage_ops_and_sram(small: tuple[Plan, Topology]) -> None:
    plan, topo = small
    topo = _states_topology(topo)
    chips = _chips(_parse(render_rack_map(plan, topo)))
    stage = plan.replica_stages(1)[3]
    tip = _title(chips[stage.chips[0]])
    assert tip.startswith(stage.chips[0])
    assert "state: placed" in tip
    assert f"replica 1 · stage {stage.index}" in tip
    assert f"{stage.first.label} … {stage.last.label}" in tip
    assert "MiB" in tip
    failed_tip = _title(chips["rack-0/node-0/chip-5"])
    assert "failed" in failed_tip and "replica 0" in failed_tip  # still says what it held
    assert _title(chips["rack-0/node-1/chip-5"]) == "rack-0/node-1/chip-5\nstate: free"
    assert "spare" in _title(chips[plan.spares[0]])


def test_header_and_legend(small: tuple[Plan, Topology]) -> None:
    plan, topo = small
    text = _texts(_parse(render_rack_map(plan, _states_topology(topo))))
    for needle in (
        "demo",
        "tiny-llama",
        "2 replicas × 12 pipeline stages × TP 1",
        f"lower bound {plan.chips_lower_bound}",
        f"and target {plan.chips_target} · ",
        "tokens/s per user",
        "replica 0",
        "replica 1",
        "stage 0 → stage 11",
        "placed by this plan",
        "spare",
        "failed (1)",
        "cordoned (8)",
        "used by other deployments (1)",
        "free",
        "rack-0",
        "rack-1",
        "node-2",
    ):
        assert needle in text, needle


def test_chips_against_the_target_over_it_and_without_one(small: tuple[Plan, Topology]) -> None:
    """A plan over its target (a forced stage count, a crowded topology) says by how much; a
    plan stored before targets were recorded (chipsTarget 0) shows the lower bound only."""
    plan, topo = small
    assert (plan.chips_used, plan.chips_lower_bound, plan.chips_target) == (24, 22, 24)
    over = dataclasses.replace(plan, chips_target=21)
    text = _texts(_parse(render_rack_map(over, topo)))
    assert "24 chips used vs lower bound 22 (+9.1%) and target 21 (3 over it) · " in text
    assert chips_line(over) == (
        "chips used / lower bound / target: 24 / 22 / 21 (x1.091 of the bound, 3 over the target)"
    )
    old = dataclasses.replace(plan, chips_target=0)
    text = _texts(_parse(render_rack_map(old, topo)))
    assert "24 chips used vs lower bound 22 (+9.1%) · " in text and "target" not in text
    assert chips_line(old) == "chips used / lower bound: 24 / 22 (x1.091 of the bound)"


def test_failed_argument_and_bare_topology(small: tuple[Plan, Topology]) -> None:
    plan, topo = small
    chips = _chips(_parse(render_rack_map(plan, topo, failed=["rack-1/node-0"])))
    assert all(chips[f"rack-1/node-0/chip-{i}"].get("fill") == FAILED_FILL for i in range(8))
    with pytest.raises(InputError):
        render_rack_map(plan, topo, failed=["rack-9/node-0/chip-0"])
    bare = _parse(render_rack_map(None, topo))
    assert {rect.get("fill") for rect in _chips(bare).values()} == {FREE_FILL}
    assert "placed" not in _texts(bare)


def test_text_is_escaped_and_output_is_deterministic(small: tuple[Plan, Topology]) -> None:
    plan, topo = small
    odd = dataclasses.replace(plan, deployment='a<b>&"c"')
    svg = render_rack_map(odd, topo)
    assert 'a<b>&"c"' in _texts(_parse(svg))
    assert svg == render_rack_map(odd, topo)
    assert svg.startswith("<?xml") and svg.rstrip().endswith("</svg>")


def test_stale_plan_ids_are_reported_not_raised(small: tuple[Plan, Topology]) -> None:
    plan, _ = small
    one_rack = preset_topology(1, "dev")
    root = _parse(render_rack_map(plan, one_rack))
    assert len(_chips(root)) == one_rack.chip_count
    assert "not in this topology" in _texts(root)


def test_largest_system_stays_small(big: tuple[Plan, Topology]) -> None:
    plan, topo = big
    topo = topo.with_states({ChipRef(3, 4, 2): ChipState.FAILED})
    svg = render_rack_map(plan, topo)
    assert len(svg.encode("utf-8")) < 3_000_000
    chips = _chips(_parse(svg))
    assert len(chips) == topo.chip_count == 10_440
    assert chips["rack-3/node-4/chip-2"].get("fill") == FAILED_FILL
    placed = [
        c
        for c, r in chips.items()
        if r.get("fill", "").startswith("#") and r.get("fill") not in (FREE_FILL, USED_FILL)
    ]
    assert len(placed) == plan.chips_used - 1
