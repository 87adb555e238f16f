"""Terminal views of plans: the explaining table and a text rack map (rich)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from orchestrator.rackmap import CORDONED, FAILED, FREE, PLACED, SPARE, USED, chip_kind
from placement.plan import Plan, StagePlan
from placement.topology import ChipRef, Topology

MiB = 1 << 20
REPLICA_COLOURS = (
    "cyan",
    "magenta",
    "green",
    "yellow",
    "blue",
    "red",
    "bright_cyan",
    "bright_magenta",
)
MAX_ROWS_PER_REPLICA = 24
MAX_MAP_RACKS = 8


class _PipeConsole(Console):
    """rich exits 1 when the reader goes away (`lpuctl plan ... | head`), and 1 means "does
    not fit" to lpuctl's callers: raise BrokenPipeError instead, which the CLI treats as done."""

    def on_broken_pipe(self) -> None:
        raise BrokenPipeError


def _console() -> Console:
    """A console that keeps table rows on one line even when piped (rich assumes 80 columns)."""
    probe = Console()
    width = probe.width if probe.is_terminal else 160
    return _PipeConsole(highlight=False, soft_wrap=False, width=max(100, width))


def print_plan_table(plan: Plan, topology: Topology, console: Console | None = None) -> None:
    console = console or _console()
    pred = plan.predicted
    console.print(Text(f"Plan for {plan.deployment}", style="bold"))
    console.print(
        f"  model {plan.model} at {plan.precision}, context {plan.max_context}, "
        f"batch {plan.max_batch}, profile {plan.profile}\n"
        f"  {plan.replicas} replica(s) x {plan.pipeline_stages} pipeline stage(s) x "
        f"tensorParallel {plan.tensor_parallel} = {plan.chips_used} chips; "
        f"{len(plan.spares)} spare chips\n"
        f"  {chips_line(plan)}\n"
        f"  predicted: {pred.latency_ms_per_token:.3f} ms/token, "
        f"{pred.tokens_per_second_per_user:,.1f} tokens/s per user, "
        f"{pred.tokens_per_second:,.1f} tokens/s in all "
        f"(bottleneck stage {pred.bottleneck_stage_ms * 1e3:.2f} us)\n"
        f"  planned in {plan.plan_seconds * 1e3:.1f} ms"
    )
    console.print(stage_table(plan))
    for note in plan.notes:
        console.print(f"  note: {note}")
    if len(topology.rack_names) <= MAX_MAP_RACKS:
        console.print(rack_map_text(plan, topology))
    else:
        console.print(f"  (rack map omitted for {len(topology.rack_names)} racks: use --svg)")


def chips_line(plan: Plan) -> str:
    """Chips used against the SRAM lower bound and the plan's target (`chipsTarget`: the most
    chips the planner aims for, see `placement.partition.chips_target`), with the ratio to the
    bound, e.g. `chips used / lower bound / target: 22 / 21 / 22 (x1.048 of the bound, within
    the target)`. A plan stored before targets were recorded (target 0) shows the bound only.
    """
    ratio = plan.chips_used / plan.chips_lower_bound if plan.chips_lower_bound else 0.0
    if not plan.chips_target:
        return (
            f"chips used / lower bound: {plan.chips_used} / {plan.chips_lower_bound} "
            f"(x{ratio:.3f} of the bound)"
        )
    over = plan.chips_used - plan.chips_target
    verdict = f"{over} over the target" if over > 0 else "within the target"
    return (
        f"chips used / lower bound / target: {plan.chips_used} / {plan.chips_lower_bound} / "
        f"{plan.chips_target} (x{ratio:.3f} of the bound, {verdict})"
    )


def stage_table(plan: Plan) -> Table:
    table = Table(title="Stages", title_justify="left", show_lines=False)
    for header, justify in (
        ("replica", "right"),
        ("stage", "right"),
        ("ops", "left"),
        ("chips", "left"),
        ("SRAM used / capacity", "right"),
        ("stage time", "right"),
    ):
        table.add_column(header, justify=justify, no_wrap=header in ("ops", "chips"))  # type: ignore[arg-type]
    for replica in range(plan.replicas):
        stages = plan.replica_stages(replica)
        shown = _elide(stages)
        colour = REPLICA_COLOURS[replica % len(REPLICA_COLOURS)]
        for stage in shown:
            if stage is None:
                table.add_row(
                    "",
                    "...",
                    f"{len(stages) - MAX_ROWS_PER_REPLICA + 4} more stages (-o json lists all)",
                    "",
                    "",
                    "",
                )
                continue
            used = stage.sram_bytes_per_chip
            cap = stage.sram_capacity_bytes
            table.add_row(
                Text(str(replica), style=colour),
                str(stage.index),
                f"{stage.first.label} .. {stage.last.label}",
                _chips_label(stage),
                f"{used / MiB:,.2f} / {cap / MiB:,.0f} MiB ({used / cap:.0%})",
                f"{stage.stage_seconds * 1e6:,.2f} us",
            )
    return table


def _elide(stages: list[StagePlan]) -> list[StagePlan | None]:
    if len(stages) <= MAX_ROWS_PER_REPLICA:
        return list(stages)
    head = MAX_ROWS_PER_REPLICA - 6
    return [*stages[:head], None, *stages[-2:]]


def _chips_label(stage: StagePlan) -> str:
    if len(stage.chips) == 1:
        return stage.chips[0]
    node = stage.chips[0].rsplit("/", 1)[0]
    ids = ",".join(c.rsplit("-", 1)[1] for c in stage.chips)
    return f"{node}/chip-{{{ids}}}"


def rack_map_text(plan: Plan | None, topology: Topology) -> Text:
    """One line per node: each chip as a stage number coloured by replica, or a state mark.

    Marks: `S` spare, `X` failed, `C` cordoned, `U` used by another deployment, `.` free.
    """
    owner: dict[str, tuple[int, int]] = {}
    spares: set[str] = set()
    if plan is not None:
        for stage in plan.stages:
            for chip in stage.chips:
                owner[chip] = (stage.replica, stage.index)
        spares = set(plan.spares)
    text = Text(
        "Rack map (stage number per chip, colour = replica; S spare, X failed, "
        "C cordoned, U used, . free)\n"
    )
    width = max(3, len(str(plan.pipeline_stages)) + 1) if plan else 3
    for rack, nodes in enumerate(topology.nodes_per_rack):
        text.append(f"  {topology.rack_names[rack]}\n", style="bold")
        for node in range(nodes):
            text.append(f"    node-{node:<3}")
            for ref in topology.node_chips(rack, node):
                cell, style = _cell(topology, ref, owner, spares)
                text.append(cell.rjust(width), style=style)
            text.append("\n")
    return text


_GLYPHS = {
    FAILED: ("X", "bold red"),
    CORDONED: ("C", "dim"),
    SPARE: ("S", "bold white"),
    USED: ("U", "dim"),
    FREE: (".", "dim"),
}


def _cell(
    topology: Topology, ref: ChipRef, owner: dict[str, tuple[int, int]], spares: set[str]
) -> tuple[str, str]:
    chip = topology.chip_id(ref)
    kind = chip_kind(topology.state(ref), chip in owner, chip in spares)
    if kind == PLACED:
        replica, stage = owner[chip]
        return str(stage), REPLICA_COLOURS[replica % len(REPLICA_COLOURS)]
    return _GLYPHS[kind]
