"""The parallel work of a deployment over Ray tasks: compiling its shards.

`compile_plan_ray` is `orchestrator.compiler.compile_plan` with the blob writes fanned out:
the driver builds every chip's program (cheap: names slices, computes recipes, checks SRAM),
keeps the distinct ones the store lacks, and Ray tasks write those into the shared shard store.
Everything else (dedupe across replicas, the recipe index, the `ShardRef`s and their order) is
`compile_plan`'s own code, so the result is exactly the in-process one: a blob is
content-addressed, and whichever process writes it, its shard id is the BLAKE3 of its bytes.

Each task writes a contiguous run of programs, balanced by weight bytes, and opens the weights once
(a seed regenerates them; a checkpoint directory is memory-mapped): the task count defaults to
two per Ray CPU, so a slow shard does not leave a core idle at the end. Tasks need the store
directory and a checkpoint directory at the same path on every Ray node (one machine, or a
shared filesystem on a cluster); a `WeightSource` object that is neither is written in process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray

from orchestrator.compiler import (
    ShardProgram,
    ShardRef,
    WeightInput,
    compile_plan,
    open_weight_source,
    write_program,
)
from orchestrator.shard_store import ShardStore, StoredBlob
from placement.models import ModelConfig
from placement.plan import Plan
from shardformat.text import TextSpec


def compile_plan_ray(
    plan: Plan,
    model_cfg: ModelConfig,
    source: WeightInput | None,
    store_dir: str | Path,
    *,
    virtual: bool | None = None,
    text: TextSpec | None = None,
    tasks: int | None = None,
) -> list[ShardRef]:
    """`compile_plan` with the shard writes spread over up to `tasks` Ray tasks (default two
    per CPU of the connected Ray cluster). Ray must be initialized."""
    if not ray.is_initialized():
        raise RuntimeError("compile_plan_ray needs Ray: ray.init() or a RayRuntime first")
    if source is not None and not isinstance(source, (int, str, os.PathLike)):
        return compile_plan(plan, model_cfg, source, store_dir, virtual=virtual, text=text)
    cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
    count = tasks or max(1, 2 * int(cpus))

    def write(programs: list[ShardProgram]) -> dict[str, StoredBlob]:
        batches = balanced_batches(programs, count)
        refs = [
            _write_batch.remote(
                [_detached(p) for p in batch],
                source,
                model_cfg,
                plan.precision,
                str(store_dir),
                _fingerprint(batch[0]),
            )
            for batch in batches
        ]
        written: dict[str, StoredBlob] = {}
        for blobs in ray.get(refs):
            written |= blobs
        return written

    return compile_plan(
        plan, model_cfg, source, store_dir, virtual=virtual, text=text, write_blobs=write
    )


def balanced_batches(programs: Sequence[ShardProgram], count: int) -> list[list[ShardProgram]]:
    """Split `programs` (in plan order) into at most `count` contiguous, non-empty runs of
    similar weight bytes. Contiguous, because neighbouring stages share the tensors of an op cut
    between them, and a task's weight source caches the tensors it generated or read last."""
    count = max(1, min(count, len(programs)))
    total = sum(max(1, p.manifest.weight_bytes) for p in programs)
    batches: list[list[ShardProgram]] = [[]]
    done = 0
    for index, program in enumerate(programs):
        left = len(programs) - index  # programs not yet placed, this one included
        wanted = len(batches) * total / count  # where the current batch should end
        if (
            batches[-1]
            and len(batches) < count
            and (done >= wanted or left <= count - len(batches))
        ):
            batches.append([])
        batches[-1].append(program)
        done += max(1, program.manifest.weight_bytes)
    return batches


def _detached(program: ShardProgram) -> ShardProgram:
    """The program without its open weight source (file handles do not travel; the task
    opens its own)."""
    return dataclasses.replace(program, weights=None)


def _fingerprint(program: ShardProgram) -> dict[str, Any] | None:
    return None if program.weights is None else program.weights.fingerprint()


@ray.remote(num_cpus=1, max_retries=0)
def _write_batch(
    programs: list[ShardProgram],
    source: WeightInput | None,
    cfg: ModelConfig,
    precision: str,
    store_dir: str,
    fingerprint: dict[str, Any] | None,
) -> dict[str, StoredBlob]:
    """Write `programs` into the store; their blobs by recipe. Real programs (`fingerprint`
    set) get the weights reopened here, and refuse weights that changed since the driver
    computed the recipes."""
    store = ShardStore(store_dir)
    with contextlib.ExitStack() as stack:
        weights = None
        if fingerprint is not None:
            weights = open_weight_source(source, cfg, precision, stack)
            if weights.fingerprint() != fingerprint:
                raise RuntimeError(
                    "the weights changed while compiling: their fingerprint differs from the "
                    "one the recipes were computed with"
                )
        return {
            p.recipe: write_program(dataclasses.replace(p, weights=weights), store)
            for p in programs
        }
