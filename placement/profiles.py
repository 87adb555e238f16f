"""Chip and system profiles: every hardware number the planner uses lives here, as a setting.

`groq-rack` carries the public figures of the first-generation GroqChip systems
(`shared/reference/lpu-facts.md`); its efficiency factors are calibrated so that the cost model
predicts the one published deployment (Llama-2-70B at about 300 tokens/s per user, 4k context,
about 8 racks) — see `tests/test_planner.py::test_groq_rack_calibration`. `dev` is a toy profile
with a few MiB of SRAM so a tiny model spans several nodes on a laptop. Profiles can also be read
from YAML (a mapping of these field names, optionally `base: groq-rack` to override a preset).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from placement.errors import InputError

MiB = 1 << 20


@dataclass(frozen=True)
class LinkClass:
    """Bandwidth (bytes/s, one direction) and latency (s) of one kind of chip-to-chip hop."""

    bandwidth: float
    latency: float


@dataclass(frozen=True)
class ChipProfile:
    """Hardware of one chip and how chips are grouped and joined."""

    name: str
    sram_bytes: int
    sram_bandwidth: float  # bytes/s
    peak_ops: dict[str, float]  # ops/s by precision
    chips_per_node: int
    nodes_per_rack: int
    node_link: LinkClass  # between chips of one node (C2C, fully connected)
    rack_link: LinkClass  # between nodes of one rack
    global_link: LinkClass  # between racks (Dragonfly)
    compute_efficiency: float  # achieved / peak for matrix work
    memory_efficiency: float  # achieved / peak SRAM bandwidth for weight streaming
    hop_overhead: float  # s of scheduling slack added to every stage-to-stage hop
    headroom_fraction: float  # SRAM kept free on every chip
    max_chunks_per_chip: int  # ops larger than usable/this are cut into chunks
    # Intermediate columns of the smallest MLP or expert piece (`models.chunk_limits`).
    mlp_cut_columns: int = 128

    @property
    def usable_sram_bytes(self) -> int:
        return int(self.sram_bytes * (1.0 - self.headroom_fraction))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


GROQ_RACK = ChipProfile(
    name="groq-rack",
    sram_bytes=220 * MiB,
    sram_bandwidth=80e12,
    peak_ops={"int8": 750e12, "fp8": 750e12, "fp16": 188e12, "bf16": 188e12},
    chips_per_node=8,
    nodes_per_rack=9,
    # 16 links x 4 lanes x 25.78 Gb/s ~= 14 GB/s per link per direction; ~216 cycles at 900 MHz.
    node_link=LinkClass(bandwidth=14e9, latency=0.25e-6),
    rack_link=LinkClass(bandwidth=14e9, latency=0.5e-6),
    global_link=LinkClass(bandwidth=14e9, latency=1.5e-6),
    # Calibrated: llama-2-70b, int8, 4k context, batch 1, auto TP (picks 2: 324 chips) on 8
    # racks -> ~300 tokens/s per user. Low against the 80 TB/s vendor figure: it also absorbs
    # per-op scheduling overhead the model does not count separately.
    compute_efficiency=0.3,
    memory_efficiency=0.18,
    hop_overhead=2.0e-6,
    headroom_fraction=0.05,
    # Pieces of at most 1/128 of a chip, MLP pieces of 32 columns (llama-3.1-405b: 1.5 MiB at
    # int8; 6 MiB at 128 columns): a stage boundary leaves little of a chip unused. The
    # partitioner charges norms and scales once per stage, so finer pieces cost no bytes.
    max_chunks_per_chip=128,
    mlp_cut_columns=32,
)

DEV = ChipProfile(
    name="dev",
    sram_bytes=2 * MiB,
    sram_bandwidth=20e9,
    peak_ops={"int8": 100e9, "fp8": 100e9, "fp16": 50e9, "bf16": 50e9},
    chips_per_node=8,
    nodes_per_rack=3,
    node_link=LinkClass(bandwidth=2e9, latency=50e-6),
    rack_link=LinkClass(bandwidth=1e9, latency=100e-6),
    global_link=LinkClass(bandwidth=1e9, latency=150e-6),
    compute_efficiency=0.5,
    memory_efficiency=0.5,
    hop_overhead=50e-6,
    headroom_fraction=0.05,
    max_chunks_per_chip=32,
)

DEV_WHOLE_OPS = dataclasses.replace(
    DEV,
    name="dev-whole-ops",
    sram_bytes=64 * MiB,
    # Never cut an op: with one chunk per op, stage boundaries fall only between whole ops,
    # where the pipeline is bit-identical to the single-process reference executor (a cut
    # inside an op sums its matrix product in pieces). Used to check that contract end to end.
    max_chunks_per_chip=1,
)

PROFILES: dict[str, ChipProfile] = {p.name: p for p in (GROQ_RACK, DEV, DEV_WHOLE_OPS)}


def profile_names() -> list[str]:
    return sorted(PROFILES)


def get_profile(name: str, *, field: str = "profile") -> ChipProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise InputError(
            f"unknown chip profile {name!r}; known profiles: {', '.join(profile_names())}",
            field=field,
        ) from None


_INT_FIELDS = {
    "sram_bytes",
    "chips_per_node",
    "nodes_per_rack",
    "max_chunks_per_chip",
    "mlp_cut_columns",
}
_INT_LIMITS = {  # sizes past these are typos, and would make planning walk millions of chips
    "chips_per_node": 64,
    "nodes_per_rack": 1024,
    "max_chunks_per_chip": 4096,
    "mlp_cut_columns": 1 << 16,
    "sram_bytes": 1 << 40,
}
_FLOAT_FIELDS = {
    "sram_bandwidth",
    "compute_efficiency",
    "memory_efficiency",
    "hop_overhead",
    "headroom_fraction",
}
_LINK_FIELDS = {"node_link", "rack_link", "global_link"}
_FRACTION_FIELDS = {"compute_efficiency", "memory_efficiency"}


def profile_from_dict(raw: Any, *, source: str, field: str = "profile") -> ChipProfile:
    """A profile from a YAML mapping: `base` (a preset name, default groq-rack) plus overrides."""
    if not isinstance(raw, dict):
        raise InputError("a profile must be a mapping", source=source, field=field)
    known = {f.name for f in fields(ChipProfile)} | {"base"}
    for key in raw:
        if key not in known:
            raise InputError(
                f"unknown profile field {key!r}; known: {', '.join(sorted(known))}",
                source=source,
                field=f"{field}.{key}",
            )
    base_name = raw.get("base", "groq-rack")
    if not isinstance(base_name, str):
        raise InputError("must be a profile name", source=source, field=f"{field}.base")
    base = get_profile(base_name, field=f"{field}.base")
    updates: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{field}.{key}"
        if key == "base":
            continue
        if key == "name":
            if not isinstance(value, str) or not value:
                raise InputError("must be a non-empty string", source=source, field=path)
            updates[key] = value
        elif key in _INT_FIELDS:
            updates[key] = _bounded_number(
                value, source, path, integer=True, upper=_INT_LIMITS[key]
            )
        elif key in _FLOAT_FIELDS:
            upper = 1.0 if key in _FRACTION_FIELDS or key == "headroom_fraction" else None
            updates[key] = _bounded_number(
                value,
                source,
                path,
                upper=upper,
                allow_zero=key in ("hop_overhead", "headroom_fraction"),
            )
        elif key in _LINK_FIELDS:
            updates[key] = _link_from_dict(value, source, path)
        elif key == "peak_ops":
            updates[key] = _peak_ops(value, source, path)
    if "name" not in updates:
        updates["name"] = f"{base.name}-custom" if updates else base.name
    return dataclasses.replace(base, **updates)


def _bounded_number(
    value: Any,
    source: str,
    path: str,
    *,
    integer: bool = False,
    upper: float | None = None,
    allow_zero: bool = False,
) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InputError(f"must be a number, got {value!r}", source=source, field=path)
    if integer and not isinstance(value, int):
        raise InputError(f"must be an integer, got {value!r}", source=source, field=path)
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise InputError(
            f"must be a positive finite number, got {value!r}", source=source, field=path
        )
    if upper is not None and value > upper:
        raise InputError(f"must be at most {upper}, got {value!r}", source=source, field=path)
    if integer and value > 1 << 48:
        raise InputError(f"is unreasonably large: {value}", source=source, field=path)
    return value


def _link_from_dict(raw: Any, source: str, path: str) -> LinkClass:
    if not isinstance(raw, dict) or set(raw) - {"bandwidth", "latency"}:
        raise InputError("must be a mapping with bandwidth and latency", source=source, field=path)
    bandwidth = _bounded_number(raw.get("bandwidth", 1e9), source, f"{path}.bandwidth")
    latency = _bounded_number(raw.get("latency", 0.0), source, f"{path}.latency", allow_zero=True)
    return LinkClass(bandwidth=float(bandwidth), latency=float(latency))


def _peak_ops(raw: Any, source: str, path: str) -> dict[str, float]:
    if not isinstance(raw, dict):
        raise InputError("must be a mapping of precision to ops/s", source=source, field=path)
    result = dict(GROQ_RACK.peak_ops)
    for key, value in raw.items():
        if key not in result:
            raise InputError(f"unknown precision {key!r}", source=source, field=f"{path}.{key}")
        result[key] = float(_bounded_number(value, source, f"{path}.{key}"))
    return result
