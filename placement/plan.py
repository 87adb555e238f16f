"""A plan is data: which op range runs on which chips, with sizes and predicted speed.

`Plan.to_dict()` is the JSON/YAML shape `lpuctl plan -o json` prints; `Plan.from_dict()` reads
it back, so a plan can be stored, diffed and re-planned later. Everything except `planSeconds`
is a pure function of the inputs: `to_dict(timing=False)` is byte-for-byte reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from placement.cost import Prediction
from placement.topology import ChipRef


@dataclass(frozen=True)
class OpCut:
    """A position in the op list: op `op` (index), chunk `chunk` of `chunks`."""

    op: int
    name: str
    chunk: int
    chunks: int

    @property
    def label(self) -> str:
        return self.name if self.chunks == 1 else f"{self.name}[{self.chunk + 1}/{self.chunks}]"

    def to_dict(self) -> dict[str, Any]:
        return {"op": self.op, "name": self.name, "chunk": self.chunk, "chunks": self.chunks}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OpCut:
        return cls(int(raw["op"]), str(raw["name"]), int(raw["chunk"]), int(raw["chunks"]))


@dataclass(frozen=True)
class StagePlan:
    replica: int
    index: int
    first: OpCut  # inclusive
    last: OpCut  # inclusive
    chips: tuple[str, ...]
    sram_bytes_per_chip: int
    sram_capacity_bytes: int
    stage_seconds: float
    activation_bytes_out: int
    # Parsed `chips`, kept beside the ids so failover need not parse thousands of ids; empty
    # when the plan was read back from a dict (callers then parse against their topology).
    refs: tuple[ChipRef, ...] = field(default=(), compare=False, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "replica": self.replica,
            "index": self.index,
            "ops": [self.first.label, self.last.label],
            "opRange": {"first": self.first.to_dict(), "last": self.last.to_dict()},
            "chips": list(self.chips),
            "sramBytesPerChip": self.sram_bytes_per_chip,
            "sramCapacityBytes": self.sram_capacity_bytes,
            "stageMs": round(self.stage_seconds * 1e3, 6),
            "activationBytesOut": self.activation_bytes_out,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> StagePlan:
        return cls(
            replica=int(raw["replica"]),
            index=int(raw["index"]),
            first=OpCut.from_dict(raw["opRange"]["first"]),
            last=OpCut.from_dict(raw["opRange"]["last"]),
            chips=tuple(raw["chips"]),
            sram_bytes_per_chip=int(raw["sramBytesPerChip"]),
            sram_capacity_bytes=int(raw["sramCapacityBytes"]),
            stage_seconds=float(raw["stageMs"]) / 1e3,
            activation_bytes_out=int(raw["activationBytesOut"]),
        )


@dataclass(frozen=True)
class Plan:
    deployment: str
    model: str
    precision: str
    profile: str
    max_context: int
    max_batch: int
    replicas: int
    tensor_parallel: int
    pipeline_stages: int
    stages: tuple[StagePlan, ...]
    spares: tuple[str, ...]
    chips_used: int
    chips_lower_bound: int
    sram_bytes_needed: int
    predicted: Prediction
    notes: tuple[str, ...] = ()
    # The most chips the plan should use (`partition.chips_target`); 0 in plans stored before
    # it was recorded.
    chips_target: int = 0
    plan_seconds: float = field(default=0.0, compare=False)

    def replica_stages(self, replica: int) -> list[StagePlan]:
        return [s for s in self.stages if s.replica == replica]

    def chips(self) -> list[str]:
        return [chip for stage in self.stages for chip in stage.chips]

    def with_timing(self, seconds: float) -> Plan:
        return replace(self, plan_seconds=seconds)

    def to_dict(self, *, timing: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "deployment": self.deployment,
            "model": self.model,
            "precision": self.precision,
            "profile": self.profile,
            "maxContext": self.max_context,
            "maxBatch": self.max_batch,
            "replicas": self.replicas,
            "tensorParallel": self.tensor_parallel,
            "pipelineStages": self.pipeline_stages,
            "chipsUsed": self.chips_used,
            "chipsLowerBound": self.chips_lower_bound,
            "chipsTarget": self.chips_target,
            "sramBytesNeeded": self.sram_bytes_needed,
            "spares": list(self.spares),
            "predicted": self.predicted.to_dict(),
            "notes": list(self.notes),
            "stages": [s.to_dict() for s in self.stages],
        }
        if timing:
            out["planSeconds"] = round(self.plan_seconds, 6)
        return out

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        pred = raw["predicted"]
        return cls(
            deployment=str(raw["deployment"]),
            model=str(raw["model"]),
            precision=str(raw["precision"]),
            profile=str(raw["profile"]),
            max_context=int(raw["maxContext"]),
            max_batch=int(raw["maxBatch"]),
            replicas=int(raw["replicas"]),
            tensor_parallel=int(raw["tensorParallel"]),
            pipeline_stages=int(raw["pipelineStages"]),
            stages=tuple(StagePlan.from_dict(s) for s in raw["stages"]),
            spares=tuple(raw["spares"]),
            chips_used=int(raw["chipsUsed"]),
            chips_lower_bound=int(raw["chipsLowerBound"]),
            sram_bytes_needed=int(raw["sramBytesNeeded"]),
            predicted=Prediction(
                latency_ms_per_token=float(pred["latencyMsPerToken"]),
                tokens_per_second_per_user=float(pred["tokensPerSecondPerUser"]),
                tokens_per_second=float(pred["tokensPerSecond"]),
                bottleneck_stage_ms=float(pred["bottleneckStageMs"]),
            ),
            notes=tuple(raw.get("notes", ())),
            chips_target=int(raw.get("chipsTarget", 0)),
            plan_seconds=float(raw.get("planSeconds", 0.0)),
        )
