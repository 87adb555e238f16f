"""The LPUDeployment CustomResourceDefinition, generated from the deployment file's JSON Schema.

One source: `orchestrator/data/lpudeployment.schema.json` is what `lpuctl` validates with, and
`spec.crd_openapi_schema()` turns it into the structural subset Kubernetes accepts. This module
adds what only the API server can enforce, and writes `manifests/crd/lpudeployment.yaml`:

* CEL rules (`x-kubernetes-validations`) for the cross-field checks `lpuctl` makes in Python
  (`spec._semantic_errors`): exactly one of `model.preset` / `model.config`; a known preset; and
  `serving.maxContext` within the preset's `max_position_embeddings` — the preset table comes
  from `placement.models`, so a new preset regenerates the rule. Rack names are a
  `x-kubernetes-list-type: set`, so the server refuses duplicates as `lpuctl` does. What CEL
  cannot know (a Hugging Face `config.json` on the operator's disk, a checkpoint directory) the
  operator checks with the same code as `lpuctl` and reports as condition `Ready=False`,
  reason `InvalidSpec`, and a Warning event.
* the status schema the operator writes (phase, conditions, replicas, chips and racks used,
  loading progress, predicted tokens/s), the status and scale subresources, and the printer
  columns READY, PHASE, CHIPS, RACKS, TOKENS/S, AGE.

`python -m orchestrator.crd` rewrites the file; `--check` exits 1 when it is stale (a test runs
it). The output is deterministic: the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec import API_VERSION, KIND, crd_openapi_schema
from placement.models import model_preset, preset_names

GROUP, VERSION = API_VERSION.split("/")
PLURAL, SINGULAR, SHORT_NAME = "lpudeployments", "lpudeployment", "lpud"
CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_PATH = Path(__file__).resolve().parent.parent / "manifests" / "crd" / "lpudeployment.yaml"

CONDITION_TYPES = ("Placed", "Loaded", "Synchronized", "Ready", "Degraded")

_CONDITION = {
    "type": "object",
    "required": ["type", "status"],
    "properties": {
        "type": {"type": "string", "enum": list(CONDITION_TYPES), "description": "Condition."},
        "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
        "reason": {"type": "string", "maxLength": 1024},
        "message": {"type": "string", "maxLength": 32768},
        "lastTransitionTime": {"type": "string", "format": "date-time"},
        "observedGeneration": {"type": "integer", "minimum": 0},
    },
}

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Observed state, written by the operator through the status subresource.",
    "properties": {
        "phase": {
            "type": "string",
            "description": "Pending, Placing, Compiling, Loading, Synchronizing, Ready, "
            "Degraded, Failed or Deleting.",
        },
        "reason": {"type": "string", "description": "Why the deployment is in this phase."},
        "message": {"type": "string", "description": "The phase in words."},
        "observedGeneration": {
            "type": "integer",
            "description": "The metadata.generation the status describes.",
        },
        "replicas": {"type": "integer", "description": "Replicas desired (spec.replicas)."},
        "readyReplicas": {"type": "integer", "description": "Replicas serving."},
        "ready": {"type": "string", "description": "readyReplicas/replicas, for kubectl get."},
        "chips": {"type": "integer", "description": "Chips the deployment's replicas use."},
        "racks": {"type": "integer", "description": "Racks the deployment's replicas use."},
        "rackNames": {"type": "array", "items": {"type": "string"}},
        "bytesLoaded": {"type": "integer", "description": "Shard bytes loaded into SRAM."},
        "bytesTotal": {"type": "integer", "description": "Shard bytes to load in all."},
        "loadedPercent": {"type": "integer", "minimum": 0, "maximum": 100},
        "predictedTokensPerSecond": {
            "type": "number",
            "description": "The plan's predicted aggregate tokens/s (all replicas).",
        },
        "predictedLatencyMsPerToken": {"type": "number"},
        "conditions": {
            "type": "array",
            "items": _CONDITION,
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    },
}

PRINTER_COLUMNS = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.ready",
        "description": "ready/desired",
    },
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Chips", "type": "integer", "jsonPath": ".status.chips"},
    {"name": "Racks", "type": "integer", "jsonPath": ".status.racks"},
    {
        "name": "Tokens/s",
        "type": "number",
        "jsonPath": ".status.predictedTokensPerSecond",
        "description": "predicted aggregate tokens/s",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def _context_rule() -> dict[str, str]:
    """maxContext within the preset's context window, as `lpuctl` checks it."""
    windows = sorted({(n, model_preset(n).max_position_embeddings) for n in preset_names()})
    table = ", ".join(f"'{n}': {w}" for n, w in windows)
    return {
        "rule": (
            "!has(self.model.preset) || !(self.model.preset in {" + table + "}) || "
            "!has(self.serving) || !has(self.serving.maxContext) || "
            "self.serving.maxContext <= {" + table + "}[self.model.preset]"
        ),
        "message": "serving.maxContext exceeds the model preset's context window "
        "(max_position_embeddings)",
        "fieldPath": ".serving.maxContext",
    }


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema: the file schema's subset plus CEL rules and the status."""
    schema = crd_openapi_schema()
    spec = schema["properties"]["spec"]
    model = spec["properties"]["model"]
    names = ", ".join(f"'{n}'" for n in sorted(preset_names()))
    model["x-kubernetes-validations"] = [
        {
            "rule": "has(self.preset) != has(self.config)",
            "message": "set exactly one of preset or config",
        },
        {
            "rule": f"!has(self.preset) || self.preset in [{names}]",
            "message": f"unknown model preset (known presets: {names.replace(chr(39), '')})",
            "fieldPath": ".preset",
        },
    ]
    spec["x-kubernetes-validations"] = [_context_rule()]
    racks = spec["properties"]["placement"]["properties"]["racks"]
    racks["x-kubernetes-list-type"] = "set"
    schema["properties"]["status"] = copy.deepcopy(STATUS_SCHEMA)
    return schema


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/part-of": "lockstep"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": [SHORT_NAME],
                "categories": ["lockstep"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.readyReplicas",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


HEADER = (
    "# GENERATED by `python -m orchestrator.crd` from orchestrator/data/lpudeployment.schema.json\n"
    "# (the schema lpuctl validates with). Do not edit: change the schema or orchestrator/crd.py.\n"
)


def render() -> str:
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestrator.crd", description=__doc__)
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    parser.add_argument("--out", type=Path, default=CRD_PATH)
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.out.read_text("utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is stale: run python -m orchestrator.crd", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text, "utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
