"""Draw a plan (or a bare topology) as a standalone SVG rack map.

Why a picture: a plan for a big model is thousands of chip ids; an operator deciding whether a
placement is sane (is each replica kept inside a few racks? do the stages walk the racks in
order? where are the spares relative to the chips they would replace?) sees it at a glance on a
map and not at all in a YAML dump. `lpuctl plan --svg` writes this file;
hovering a chip in a browser shows its id, state, replica/stage, op range and SRAM use.

Encoding (the legend inside the picture says the same):

- racks side by side, wrapped into rows so the map stays roughly 16:10; each rack is a labelled
  box, each node a labelled row of chip squares;
- a chip placed by the plan is filled with its replica's hue; lightness runs from dark (first
  pipeline stage) to light (last stage), so the direction of the pipeline is visible;
- spares (the plan's and the topology's) are white with a dark hatch and a dashed outline;
- failed chips are red with a white cross, cordoned chips grey with one white diagonal stripe,
  chips held by other deployments dark grey, free chips white with a light outline.

Failed and cordoned win over plan membership: those are what an operator must act on (the
tooltip still names the replica and stage that sat there). Chip squares shrink with the size of
the cluster (22 px on a laptop topology down to 8 px on 145 racks x 72 chips) and every chip is
one `<rect>` whose `fill` says its class, with a `data-chip` attribute and a `<title>` tooltip,
so the largest system stays near 2 MB and renders in tens of milliseconds.

Output is a pure function of the inputs: same plan and topology, same bytes (no clock, no ids
from memory addresses, fixed float formatting, iteration in topology order).
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Iterable
from dataclasses import dataclass
from xml.sax.saxutils import escape

from placement.errors import InputError
from placement.plan import Plan, StagePlan
from placement.profiles import MiB
from placement.topology import ChipRef, ChipState, Topology

# --- colours ------------------------------------------------------------------------------

FREE_FILL = "#ffffff"
USED_FILL = "#4d4d4d"
SPARE_FILL = "url(#p-spare)"
FAILED_FILL = "url(#p-failed)"
CORDONED_FILL = "url(#p-cordoned)"
CHIP_STROKE = "#a8a8a8"
SPARE_STROKE = "#222222"
FAILED_STROKE = "#8b0000"

# Hand-picked, well separated hues for the first replicas (red is kept for failures); later
# replicas continue along a golden-ratio walk over the same non-red band.
_BASE_HUES = (210.0, 30.0, 125.0, 280.0, 180.0, 320.0, 52.0, 245.0)
_HUE_LO, _HUE_HI = 25.0, 335.0
_SATURATION = 0.70
_LIGHT_FIRST, _LIGHT_LAST = 0.28, 0.80  # stage 0 dark -> last stage light

MIN_CANVAS_WIDTH = 780
MARGIN = 16
LEGEND_REPLICAS = 16  # legend swatches shown before "+N more replicas"


def replica_hue(replica: int, replicas: int) -> float:
    """Hue in degrees of `replica` out of `replicas`; never red (red means a failed chip).

    Up to eight replicas get hand-picked hues that are easy to tell apart and to name. Beyond
    that the non-red band is cut into `replicas` equal steps and walked with a stride near 3/8
    of the count, so hues are as far apart as the count allows and neighbouring replica
    numbers (often neighbours on the map) never get neighbouring hues.
    """
    if replicas <= len(_BASE_HUES):
        return _BASE_HUES[replica % len(_BASE_HUES)]
    stride = max(1, round(replicas * 0.382))
    while math.gcd(stride, replicas) != 1:
        stride += 1
    slot = (replica * stride) % replicas
    return round(_HUE_LO + (slot + 0.5) * (_HUE_HI - _HUE_LO) / replicas, 3)


def stage_colour(replica: int, replicas: int, stage: int, stages: int) -> str:
    """Fill of a chip of `stage` (0-based) of `replica` in a pipeline of `stages` stages."""
    t = stage / (stages - 1) if stages > 1 else 0.0
    light = _LIGHT_FIRST + t * (_LIGHT_LAST - _LIGHT_FIRST)
    return _hls_hex(replica_hue(replica, replicas), light, _SATURATION)


def _hls_hex(hue: float, light: float, sat: float) -> str:
    r, g, b = colorsys.hls_to_rgb(hue / 360.0, light, sat)
    return f"#{round(r * 255):02x}{round(g * 255):02x}{round(b * 255):02x}"


# --- small helpers ------------------------------------------------------------------------


def _attr(value: str) -> str:
    """Escape text for a double-quoted attribute."""
    return escape(value, {'"': "&quot;"})


def _text_width(text: str, size: float, bold: bool = False) -> float:
    """Rough rendered width of `text`: layout needs it and SVG has no text metrics offline.

    0.6 em per character over-estimates DejaVu Sans / Helvetica a little, which errs on the
    side of not overlapping.
    """
    return len(text) * size * (0.64 if bold else 0.6)


def _num(value: float) -> str:
    """Fixed, short float formatting so output bytes never depend on float repr quirks."""
    text = f"{value:.2f}".rstrip("0").rstrip(".")
    return text or "0"


def _mib(n_bytes: int, capacity: int) -> str:
    digits = 2 if capacity < 10 * MiB else 1
    return f"{n_bytes / MiB:.{digits}f}"


def _fit(text: str, width: float, size: float, bold: bool = False) -> str:
    """Cut `text` with an ellipsis so it fits `width` px (long rack names, long headers)."""
    if _text_width(text, size, bold) <= width:
        return text
    keep = max(1, int(width / (size * (0.64 if bold else 0.6))) - 1)
    return text[:keep] + "…"


# --- what each chip is --------------------------------------------------------------------


@dataclass(frozen=True)
class _Placed:
    stage: StagePlan
    rank: int  # position inside the stage's tensor-parallel group


def _plan_index(
    plan: Plan | None, topology: Topology
) -> tuple[dict[ChipRef, _Placed], set[ChipRef], list[str]]:
    """Where the plan put things, by chip; ids unknown to `topology` are returned, not raised.

    The ids are parsed rather than trusting `StagePlan.refs`, because a plan read back from a
    store may be drawn against a topology whose rack order differs from the one it was made on.
    A map is a view: drawing a stale plan should show what still matches and say what did not.
    """
    placed: dict[ChipRef, _Placed] = {}
    spares: set[ChipRef] = set()
    unknown: list[str] = []
    if plan is None:
        return placed, spares, unknown
    for stage in plan.stages:
        for rank, chip_id in enumerate(stage.chips):
            try:
                placed[topology.parse_chip(chip_id)] = _Placed(stage, rank)
            except InputError:
                unknown.append(chip_id)
    for chip_id in plan.spares:
        try:
            spares.add(topology.parse_chip(chip_id))
        except InputError:
            unknown.append(chip_id)
    return placed, spares, unknown


def _failed_refs(failed: Iterable[str], topology: Topology) -> set[ChipRef]:
    """Chip ids, or node ids meaning every chip of the node (a dead agent takes a node)."""
    refs: set[ChipRef] = set()
    for text in failed:
        ref, is_node = topology.parse_id(text, field="failed")
        if is_node:
            refs.update(topology.node_chips(ref.rack, ref.node))
        else:
            refs.add(ref)
    return refs


# Kinds, in legend order.
PLACED, SPARE, FAILED, CORDONED, USED, FREE = (
    "placed",
    "spare",
    "failed",
    "cordoned",
    "used",
    "free",
)
HIT = "hit"  # counter only: plan chips drawn as failed or cordoned
_KIND_FILL = {
    SPARE: SPARE_FILL,
    FAILED: FAILED_FILL,
    CORDONED: CORDONED_FILL,
    USED: USED_FILL,
    FREE: FREE_FILL,
}
_KIND_LABEL = {
    SPARE: "spare (hatched, dashed outline)",
    FAILED: "failed",
    CORDONED: "cordoned",
    USED: "used by other deployments",
    FREE: "free",
}


def chip_kind(state: ChipState, placed: bool, plan_spare: bool, is_failed: bool = False) -> str:
    """What a chip shows as on a rack map (SVG and text): failure and cordons win over the
    plan's use of the chip, so an operator sees them first."""
    if is_failed or state is ChipState.FAILED:
        return FAILED
    if state is ChipState.CORDONED:
        return CORDONED
    if placed:
        return PLACED  # a USED state here is this deployment holding its own chips
    if plan_spare or state is ChipState.SPARE:
        return SPARE
    if state is ChipState.USED:
        return USED
    return FREE


def _tooltip(
    chip_id: str, kind: str, placed: _Placed | None, plan: Plan | None, plan_spare: bool
) -> str:
    """Hover text. Stage and rank numbers are 0-based, as in `lpuctl plan` and the plan file."""
    if kind == PLACED:
        state_text = "placed"
    elif kind == SPARE:
        state_text = f"spare (reserved by {plan.deployment})" if plan_spare and plan else "spare"
    elif kind == USED:
        state_text = "used by another deployment"
    elif kind == FAILED and placed is not None:
        state_text = "failed (its stage must move to a spare)"
    elif kind == CORDONED and placed is not None:
        state_text = "cordoned (stage still placed here until drained)"
    else:
        state_text = kind
    lines = [chip_id, f"state: {state_text}"]
    if placed is not None and plan is not None:
        st = placed.stage
        lines.append(
            f"replica {st.replica} · stage {st.index} (of {plan.pipeline_stages})"
            f" · TP rank {placed.rank} (of {len(st.chips)})"
        )
        lines.append(f"ops {st.first.label} … {st.last.label}")
        cap = st.sram_capacity_bytes
        pct = 100.0 * st.sram_bytes_per_chip / cap if cap else 0.0
        lines.append(
            f"SRAM {_mib(st.sram_bytes_per_chip, cap)} / {_mib(cap, cap)} MiB ({pct:.0f}%)"
        )
    return "\n".join(lines)


# --- geometry -----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scale:
    """Pixel sizes, chosen from the number of chips so big clusters stay a sane size."""

    chip: int
    gap: int
    pad: int
    node_font: float
    rack_font: float
    stroke: float
    short_labels: bool

    @classmethod
    def for_topology(cls, topology: Topology) -> _Scale:
        chips = max(1, topology.chip_count)
        chip = max(8, min(22, round(22 * math.sqrt(576 / chips))))
        return cls(
            chip=chip,
            gap=max(2, chip // 6),
            pad=max(4, chip // 3),
            node_font=max(7.0, min(11.0, round(chip * 0.6, 1))),
            rack_font=max(9.0, min(13.0, round(chip * 0.75, 1))),
            stroke=0.8 if chip >= 12 else 0.5,
            short_labels=chip < 14,
        )

    def node_label(self, node: int) -> str:
        return f"n{node}" if self.short_labels else f"node-{node}"


@dataclass(frozen=True)
class _Grid:
    cols: int
    rack_w: int
    rack_heights: tuple[int, ...]
    rack_gap: int
    label_w: int
    title_h: int
    row_tops: tuple[int, ...]  # y of each grid row, relative to the grid's top
    width: int
    height: int

    def origin(self, rack: int) -> tuple[int, int]:
        row, col = divmod(rack, self.cols)
        return col * (self.rack_w + self.rack_gap), self.row_tops[row]


def _grid(topology: Topology, sc: _Scale) -> _Grid:
    """Rack boxes in row-major order, column count picked for a roughly 16:10 picture."""
    cpn = topology.profile.chips_per_node
    max_node = max(topology.nodes_per_rack) - 1 if topology.nodes_per_rack else 0
    label_w = math.ceil(_text_width(sc.node_label(max_node), sc.node_font)) + sc.pad
    title_h = math.ceil(sc.rack_font) + sc.pad + 2
    step = sc.chip + sc.gap
    rack_w = sc.pad + label_w + cpn * step - sc.gap + sc.pad
    heights = tuple(title_h + n * step - sc.gap + sc.pad for n in topology.nodes_per_rack)
    rack_gap = max(8, sc.chip)
    n = len(heights)
    typical_h = max(heights) if heights else 1
    cols = max(1, min(n, math.ceil(math.sqrt(n * typical_h / rack_w * 1.6))))
    rows = math.ceil(n / cols)
    cols = math.ceil(n / rows)  # balance: no nearly-empty last row
    tops: list[int] = []
    y = 0
    for row in range(rows):
        tops.append(y)
        y += max(heights[row * cols : (row + 1) * cols]) + rack_gap
    width = cols * (rack_w + rack_gap) - rack_gap
    return _Grid(
        cols, rack_w, heights, rack_gap, label_w, title_h, tuple(tops), width, max(0, y - rack_gap)
    )


# --- the drawing --------------------------------------------------------------------------


_DEFS = (
    '<pattern id="p-spare" width="1" height="1" patternContentUnits="objectBoundingBox">'
    '<rect width="1" height="1" fill="#ffffff"/>'
    '<path d="M0 .5L.5 1M0 0L1 1M.5 0L1 .5" stroke="#222222" stroke-width=".09"/></pattern>'
    '<pattern id="p-failed" width="1" height="1" patternContentUnits="objectBoundingBox">'
    '<rect width="1" height="1" fill="#d62728"/>'
    '<path d="M.2 .2L.8 .8M.8 .2L.2 .8" stroke="#ffffff" stroke-width=".14"/></pattern>'
    '<pattern id="p-cordoned" width="1" height="1" patternContentUnits="objectBoundingBox">'
    '<rect width="1" height="1" fill="#b0b0b0"/>'
    '<path d="M-.1 1.1L1.1 -.1" stroke="#ffffff" stroke-width=".2"/></pattern>'
)


def render_rack_map(plan: Plan | None, topology: Topology, failed: Iterable[str] = ()) -> str:
    """A complete standalone SVG document drawing `topology`, with `plan` laid over it.

    `plan=None` draws chip states only (a bare topology). `failed` names chips (or whole
    nodes) to draw as failed on top of the topology's own states — a failure report that has
    not yet been written back into the topology. Unknown ids in `failed` raise `InputError`;
    plan chip ids unknown to `topology` are listed in the header instead (a stale plan is still
    worth seeing).
    """
    sc = _Scale.for_topology(topology)
    grid = _grid(topology, sc)
    placed, plan_spares, unknown = _plan_index(plan, topology)
    failed_refs = _failed_refs(failed, topology)

    counts = {k: 0 for k in (PLACED, SPARE, FAILED, CORDONED, USED, FREE, HIT)}
    racks_svg: list[str] = []
    step = sc.chip + sc.gap
    for rack in range(len(topology.rack_names)):
        racks_svg.append(
            _rack_svg(
                rack, topology, plan, placed, plan_spares, failed_refs, counts, sc, grid, step
            )
        )

    header = _header_lines(plan, topology, counts, unknown)
    replicas = plan.replicas if plan is not None else 0
    content_w = max(grid.width, MIN_CANVAS_WIDTH - 2 * MARGIN)
    for size, bold, text in header:
        content_w = max(content_w, math.ceil(_text_width(text, size, bold)))
    legend_svg, legend_h = _legend(plan, replicas, counts, content_w)

    y = MARGIN
    head_svg: list[str] = []
    for size, bold, text in header:
        y += math.ceil(size * 1.35)
        weight = ' font-weight="bold"' if bold else ""
        head_svg.append(
            f'<text x="{MARGIN}" y="{y}" font-size="{_num(size)}"{weight}>{escape(text)}</text>'
        )
    y += 10
    legend_y = y
    grid_y = legend_y + legend_h + 12
    width = content_w + 2 * MARGIN
    height = grid_y + grid.height + MARGIN
    title = (
        f"Lockstep rack map: {plan.deployment}"
        if plan is not None
        else ("Lockstep rack map: topology")
    )

    out: list[str] = [
        '<?xml version="1.0" encoding="UTF-8"?>\n',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" '
        'font-family="DejaVu Sans, Helvetica, Arial, sans-serif" fill="#222222">\n',
        f"<title>{escape(title)}</title>\n",
        "<defs>",
        _DEFS,
        _legend_gradients(plan, replicas),
        "</defs>\n",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>\n',
        *(line + "\n" for line in head_svg),
        f'<g transform="translate({MARGIN},{legend_y})">',
        legend_svg,
        "</g>\n",
        f'<g transform="translate({MARGIN},{grid_y})">\n',
        *racks_svg,
        "</g>\n</svg>\n",
    ]
    return "".join(out)


def _rack_svg(
    rack: int,
    topology: Topology,
    plan: Plan | None,
    placed: dict[ChipRef, _Placed],
    plan_spares: set[ChipRef],
    failed_refs: set[ChipRef],
    counts: dict[str, int],
    sc: _Scale,
    grid: _Grid,
    step: int,
) -> str:
    """One rack box: a titled frame, then one labelled row of chip squares per node."""
    x0, y0 = grid.origin(rack)
    name = topology.rack_names[rack]
    nodes = topology.nodes_per_rack[rack]
    h = grid.rack_heights[rack]
    parts = [
        f'<g transform="translate({x0},{y0})">'
        f'<rect width="{grid.rack_w}" height="{h}" rx="3" fill="#f4f5f7" stroke="#8a8f98">'
        f"<title>{escape(name)}: {nodes} nodes</title></rect>"
        f'<text x="{sc.pad}" y="{sc.pad + math.ceil(sc.rack_font) - 1}" '
        f'font-size="{_num(sc.rack_font)}" font-weight="bold">'
        f"{escape(_fit(name, grid.rack_w - 2 * sc.pad, sc.rack_font, True))}</text>\n"
        f'<g stroke="{CHIP_STROKE}" stroke-width="{_num(sc.stroke)}">'
    ]
    chips_x = sc.pad + grid.label_w
    states = topology.states
    for node in range(nodes):
        y = grid.title_h + node * step
        parts.append(
            f'<text x="{sc.pad}" y="{y + sc.chip / 2 + sc.node_font * 0.36:.1f}" '
            f'font-size="{_num(sc.node_font)}" fill="#555555" stroke="none">'
            f"{sc.node_label(node)}</text>"
        )
        for ref in topology.node_chips(rack, node):
            state = states.get(ref, ChipState.FREE)
            where = placed.get(ref)
            is_plan_spare = ref in plan_spares
            kind = chip_kind(state, where is not None, is_plan_spare, ref in failed_refs)
            counts[kind] += 1
            if where is not None and kind in (FAILED, CORDONED):
                counts[HIT] += 1
            if kind == PLACED and where is not None and plan is not None:
                fill = stage_colour(
                    where.stage.replica, plan.replicas, where.stage.index, plan.pipeline_stages
                )
            else:
                fill = _KIND_FILL[kind]
            extra = ""
            if kind == SPARE:
                extra = f' stroke="{SPARE_STROKE}" stroke-dasharray="2 1"'
            elif kind == FAILED:
                extra = f' stroke="{FAILED_STROKE}"'
            chip_id = topology.chip_id(ref)
            tip = _tooltip(chip_id, kind, where, plan, is_plan_spare)
            parts.append(
                f'<rect x="{chips_x + ref.chip * step}" y="{y}" width="{sc.chip}" '
                f'height="{sc.chip}" fill="{fill}"{extra} data-chip="{_attr(chip_id)}">'
                f"<title>{escape(tip)}</title></rect>"
            )
        parts.append("\n")
    parts.append("</g></g>\n")
    return "".join(parts)


def _header_lines(
    plan: Plan | None, topology: Topology, counts: dict[str, int], unknown: list[str]
) -> list[tuple[float, bool, str]]:
    """(font size, bold, text) lines: what is deployed, how it is cut, how fast it should be."""
    prof = topology.profile
    racks = len(topology.rack_names)
    node_counts = sorted(set(topology.nodes_per_rack))
    nodes_text = (
        f"{node_counts[0]} nodes"
        if len(node_counts) == 1
        else f"{node_counts[0]}–{node_counts[-1]} nodes"
    )
    topo_line = (
        f"Topology: profile {prof.name} · {racks} rack{'s' if racks != 1 else ''} × {nodes_text}"
        f" × {prof.chips_per_node} chips = {topology.chip_count} chips · "
        f"{prof.sram_bytes / MiB:.0f} MiB SRAM per chip"
    )
    state_line = (
        f"Chips: {counts[SPARE]} spare · {counts[FAILED]} failed · "
        f"{counts[CORDONED]} cordoned · {counts[USED]} used by others · {counts[FREE]} free"
    )
    if plan is not None:
        state_line = state_line.replace("Chips: ", f"Chips: {counts[PLACED]} placed · ", 1)
        if counts[HIT]:
            hit = counts[HIT]
            state_line += f" · {hit} plan chip{' is' if hit == 1 else 's are'} failed or cordoned"
    if plan is None:
        return [
            (16.0, True, "Lockstep topology"),
            (12.0, False, topo_line),
            (12.0, False, state_line),
        ]
    pred = plan.predicted
    over = (plan.chips_used / plan.chips_lower_bound - 1.0) * 100 if plan.chips_lower_bound else 0
    target = f" and target {plan.chips_target}" if plan.chips_target else ""
    if plan.chips_target and plan.chips_used > plan.chips_target:
        target += f" ({plan.chips_used - plan.chips_target} over it)"
    lines: list[tuple[float, bool, str]] = [
        (16.0, True, f"Deployment {plan.deployment} · {plan.model} · {plan.precision}"),
        (
            12.0,
            False,
            f"{plan.replicas} replica{'s' if plan.replicas != 1 else ''} × "
            f"{plan.pipeline_stages} pipeline stages × TP {plan.tensor_parallel} · "
            f"{plan.chips_used} chips used vs lower bound {plan.chips_lower_bound} "
            f"(+{over:.1f}%){target} · {len(plan.spares)} spares · context {plan.max_context}, "
            f"batch {plan.max_batch}",
        ),
        (
            12.0,
            False,
            f"Predicted {pred.tokens_per_second_per_user:,.1f} tokens/s per user · "
            f"{pred.tokens_per_second:,.1f} tokens/s total · "
            f"{pred.latency_ms_per_token:.3f} ms/token",
        ),
        (12.0, False, topo_line),
        (12.0, False, state_line),
    ]
    if unknown:
        shown = ", ".join(unknown[:3]) + (" …" if len(unknown) > 3 else "")
        lines.append((12.0, True, f"{len(unknown)} plan chip(s) not in this topology: {shown}"))
    return lines


def _legend_gradients(plan: Plan | None, replicas: int) -> str:
    if plan is None:
        return ""
    stages = plan.pipeline_stages
    parts = []
    for r in range(min(replicas, LEGEND_REPLICAS)):
        stops = "".join(
            f'<stop offset="{_num(t)}" '
            f'stop-color="{stage_colour(r, replicas, round(t * (stages - 1)), stages)}"/>'
            for t in (0.0, 0.5, 1.0)
        )
        parts.append(f'<linearGradient id="g-r{r}">{stops}</linearGradient>')
    return "".join(parts)


def _legend(
    plan: Plan | None, replicas: int, counts: dict[str, int], width: int
) -> tuple[str, int]:
    """Legend items flowing left to right, wrapping at `width`; returns (svg, height)."""
    font = 11.0
    row_h = 20
    sw = 14  # swatch side
    parts: list[str] = []
    y = 0

    def flow(items: list[tuple[str, int, str]], y: int) -> int:
        """Place (swatch svg template, swatch width, label) items; returns the next row's y."""
        x = 0
        for swatch, w, label in items:
            item_w = w + 6 + math.ceil(_text_width(label, font)) + 18
            if x > 0 and x + item_w > width:
                x = 0
                y += row_h
            parts.append(swatch.format(x=x, y=y))
            parts.append(
                f'<text x="{x + w + 6}" y="{y + 11}" font-size="{_num(font)}">'
                f"{escape(label)}</text>"
            )
            x += item_w
        return y + row_h

    if plan is not None:
        last = plan.pipeline_stages
        parts.append(
            f'<text x="0" y="{y + 11}" font-size="{_num(font)}" font-weight="bold">'
            f"Replicas: one hue each; dark → light = stage 0 → stage {last - 1} "
            f"(pipeline direction)</text>"
        )
        y += row_h
        items: list[tuple[str, int, str]] = []
        for r in range(min(replicas, LEGEND_REPLICAS)):
            items.append(
                (
                    f'<rect x="{{x}}" y="{{y}}" width="48" height="{sw}" fill="url(#g-r{r})" '
                    f'stroke="{CHIP_STROKE}" stroke-width="0.8"/>',
                    48,
                    f"replica {r}",
                )
            )
        if replicas > LEGEND_REPLICAS:
            items.append(("", 0, f"+{replicas - LEGEND_REPLICAS} more replicas"))
        y = flow(items, y)
    hover = "id, state, stage, ops and SRAM" if plan is not None else "id and state"
    parts.append(
        f'<text x="0" y="{y + 11}" font-size="{_num(font)}" font-weight="bold">'
        f"Chip states (hover a chip for its {hover})</text>"
    )
    y += row_h
    state_items: list[tuple[str, int, str]] = []
    if plan is not None:
        state_items.append(
            (
                f'<rect x="{{x}}" y="{{y}}" width="{sw}" height="{sw}" '
                f'fill="{stage_colour(0, replicas, 0, 2)}" stroke="{CHIP_STROKE}" '
                'stroke-width="0.8"/>',
                sw,
                f"placed by this plan ({counts[PLACED]})",
            )
        )
    for kind in (SPARE, FAILED, CORDONED, USED, FREE):
        stroke = {SPARE: SPARE_STROKE, FAILED: FAILED_STROKE}.get(kind, CHIP_STROKE)
        dash = ' stroke-dasharray="2 1"' if kind == SPARE else ""
        state_items.append(
            (
                f'<rect x="{{x}}" y="{{y}}" width="{sw}" height="{sw}" fill="{_KIND_FILL[kind]}" '
                f'stroke="{stroke}" stroke-width="0.8"{dash}/>',
                sw,
                f"{_KIND_LABEL[kind]} ({counts[kind]})",
            )
        )
    y = flow(state_items, y)
    return "".join(parts), y
