"""Deployment spec: load, check and normalize an `LPUDeployment` file.

A platform engineer writes one YAML file in Kubernetes shape (`apiVersion`, `kind`, `metadata`,
`spec`); the same file works with `lpuctl apply -f` and `kubectl apply -f`. This module is the gate
every deployment passes before anything is stored (DESIGN.md, flow step 1): it turns the file into
a frozen `DeploymentSpec`, or raises one `SpecError` that lists *every* problem found, each naming
the file, the line and the dotted field path, in words a person can act on.

Layers, each a reason for a class of error:

1. Bytes. The file is capped at 1 MiB, must be UTF-8 and must not contain NUL or other control
   characters: a deployment is small hand-written text, and refusing binary input early keeps
   garbage away from the YAML parser and gives a clear message instead of a parser stack.
2. YAML. The text is *composed* (not constructed) with a SafeLoader-based composer so every node
   keeps its line. Everything a deployment never needs and an attacker might use is refused: anchors
   and aliases (billion-laughs bombs), explicit tags other than the plain core ones (`!!binary`,
   `!!python/...`, custom tags), several documents in one file, nesting deeper than 32 levels,
   duplicate keys (YAML says they are an error; PyYAML silently keeps the last one), non-string
   keys, integers beyond ±2**53 (they do not survive JSON, which is what Kubernetes stores) and
   non-finite floats.
3. Schema. `orchestrator/data/lpudeployment.schema.json` is the single source of truth, shared
   with the CRD (`crd_openapi_schema`). It is checked with jsonschema's Draft 2020-12 validator
   (integers strict: `2.0` is not an integer) and all errors are translated, with did-you-mean
   hints for misspelt fields and enum values.
4. Semantics. Rules a Kubernetes schema cannot express: exactly one of `model.preset` /
   `model.config`, a known preset, a readable Hugging Face config, an existing checkpoint
   directory, unique racks, `maxContext` within the model's `max_position_embeddings`, the exact
   `apiVersion` and `kind`, qualified label and annotation keys.

Defaults (also in the schema's `default`s, so the Kubernetes API server applies the same ones):
precision fp16, replicas 1, serving.maxContext 2048, serving.maxBatch 1,
parallelism.tensorParallel auto, parallelism.pipelineStages auto, placement.spread rack,
placement.sparesPerRack 1 (spare *nodes* kept per rack), placement.racks all racks (field
absent), failover.maxRestarts 5, failover.backoffSeconds 1, verification.intervalSeconds 300,
verification.canaryTokens 4, metadata.namespace "default".

Relative `model.config` and `model.checkpoint` paths are resolved against the directory of the
deployment file (like `kubectl -k` resolves paths against the kustomization), never against the
current directory, so the result does not depend on where `lpuctl` was started.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import ValidationError

from orchestrator.safe_yaml import (
    MAX_DEPTH,
    MAX_FILE_BYTES,
    SpecError,
    as_bytes,
    clip,
    load_yaml_bytes,
    plain_data,
    read_capped_file,
    show_value,
)
from placement.errors import InputError
from placement.errors import field_path as format_path
from placement.models import ModelConfig, model_from_hf_config, model_preset, preset_names

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "DeploymentSpec",
    "SpecError",
    "crd_openapi_schema",
    "deployment_from_manifest",
    "deployment_schema",
    "format_path",
    "load_deployment_file",
    "parse_deployment",
    "strip_server_fields",
]

API_VERSION = "lpu.lockstep.dev/v1alpha1"
KIND = "LPUDeployment"

_SCHEMA_RESOURCE = "lpudeployment.schema.json"
_DEFAULT_NAMESPACE = "default"


# --- the spec -------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DeploymentSpec:
    """A validated deployment, normalized: defaults applied, paths absolute.

    Built by `parse_deployment` / `load_deployment_file` / `deployment_from_manifest`, which
    guarantee every invariant below. Constructing it directly (handy in tests of the reconciler
    or planner) skips validation; the defaults then match the schema's.

    `tensor_parallel` and `pipeline_stages` None mean "auto" (the planner chooses); `racks`
    None means every rack.
    `manifest` is the document with defaults applied and resolved paths, ready to be stored; it
    does not take part in equality or hashing.
    """

    name: str
    namespace: str = _DEFAULT_NAMESPACE
    model_preset: str | None = None
    model_config_path: str | None = None
    checkpoint_path: str | None = None
    precision: str = "fp16"
    replicas: int = 1
    max_context: int = 2048
    max_batch: int = 1
    tensor_parallel: int | None = None
    pipeline_stages: int | None = None
    spread: str = "rack"
    spares_per_rack: int = 1
    racks: tuple[str, ...] | None = None
    max_restarts: int = 5
    backoff_seconds: float = 1.0
    verify_interval_seconds: float = 300.0  # 0: no periodic canary (orchestrator.verify)
    canary_tokens: int = 4
    source: str = "<inline>"
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # The model the validator resolved (the preset, or the config file read once, named after
    # its directory); None for a spec built by hand.
    model: ModelConfig | None = field(default=None, compare=False, hash=False, repr=False)

    def to_manifest(self) -> dict[str, Any]:
        """The full manifest (a fresh copy, safe to mutate) for storing or `kubectl apply`.

        Every optional field is written out with its value, so a stored manifest does not
        change meaning if a default changes later. For a directly constructed spec (empty
        `manifest`) it is synthesized from the fields.
        """
        if self.manifest:
            return copy.deepcopy(self.manifest)
        model: dict[str, Any] = {}
        if self.model_preset is not None:
            model["preset"] = self.model_preset
        if self.model_config_path is not None:
            model["config"] = self.model_config_path
        if self.checkpoint_path is not None:
            model["checkpoint"] = self.checkpoint_path
        placement: dict[str, Any] = {"spread": self.spread, "sparesPerRack": self.spares_per_rack}
        if self.racks is not None:
            placement["racks"] = list(self.racks)
        return {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "model": model,
                "precision": self.precision,
                "replicas": self.replicas,
                "serving": {"maxContext": self.max_context, "maxBatch": self.max_batch},
                "parallelism": {
                    "tensorParallel": "auto"
                    if self.tensor_parallel is None
                    else self.tensor_parallel,
                    "pipelineStages": "auto"
                    if self.pipeline_stages is None
                    else self.pipeline_stages,
                },
                "placement": placement,
                "failover": {
                    "maxRestarts": self.max_restarts,
                    "backoffSeconds": self.backoff_seconds,
                },
                "verification": {
                    "intervalSeconds": self.verify_interval_seconds,
                    "canaryTokens": self.canary_tokens,
                },
            },
        }


# --- public entry points --------------------------------------------------------------------


def load_deployment_file(path: str | os.PathLike[str]) -> DeploymentSpec:
    """Read, check and normalize one deployment file.

    Relative model paths inside it are resolved against the file's directory. Raises
    `SpecError` for every problem, including unreadable or oversized files.
    """
    source = os.fspath(path)
    data = read_capped_file(source, "deployment file")
    base_dir = Path(os.path.abspath(source)).parent
    return parse_deployment(data, source, base_dir)


def parse_deployment(
    text: str | bytes, source: str = "<string>", base_dir: Path | None = None
) -> DeploymentSpec:
    """Check and normalize deployment YAML given as text or bytes.

    `source` names it in error messages. Relative model paths are resolved against `base_dir`,
    which defaults to the directory of `source` when that looks like a file path, else to the
    current directory (for `<stdin>` and the like).
    """
    data = as_bytes(text, source)
    doc, lines = load_yaml_bytes(data, source, "deployment file")
    return _validate(doc, lines, source, _base_dir(source, base_dir))


def deployment_from_manifest(
    doc: Mapping[str, Any], source: str = "<manifest>", base_dir: Path | None = None
) -> DeploymentSpec:
    """Check a manifest that is already data (a stored manifest, a Kubernetes object).

    The same rules as for a file apply; errors carry no line. Objects read back from the
    Kubernetes API carry server-populated fields (`status`, `metadata.uid`, ...): pass them
    through `strip_server_fields` first.
    """
    if not isinstance(doc, Mapping):
        raise SpecError(f"a manifest must be a mapping, got {show_value(doc)}", file=source)
    errors: list[SpecError] = []
    plain = plain_data(doc, (), source, errors, depth=1)
    if errors:
        raise SpecError.combine(errors)
    return _validate(plain, {}, source, _base_dir(source, base_dir))


def strip_server_fields(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only what a user writes: apiVersion, kind, spec and the user part of metadata.

    Why: an object read from the Kubernetes API carries `status`, `metadata.uid`,
    `resourceVersion`, `managedFields`, ...; the deployment schema refuses those in a file.
    """
    out = {k: copy.deepcopy(obj[k]) for k in ("apiVersion", "kind", "spec") if k in obj}
    meta = obj.get("metadata")
    if isinstance(meta, Mapping):
        out["metadata"] = {
            k: copy.deepcopy(meta[k])
            for k in ("name", "namespace", "labels", "annotations")
            if k in meta
        }
    elif "metadata" in obj:
        out["metadata"] = copy.deepcopy(meta)
    return out


def deployment_schema() -> dict[str, Any]:
    """The deployment file's JSON Schema (a copy), e.g. for `lpuctl explain`."""
    return copy.deepcopy(_schema())


def crd_openapi_schema() -> dict[str, Any]:
    """The `openAPIV3Schema` of the LPUDeployment CRD, derived from the file schema.

    Kubernetes accepts only a structural subset of JSON Schema, so this strips what it refuses:
    the `$`-meta keys, `additionalProperties: false` next to `properties` (the API server prunes
    unknown fields instead, and `kubectl --validate=strict` reports them), and every `metadata`
    rule except those on `metadata.name` (the only ones a CRD may set). It adds `status` as an
    open object the operator writes through the status subresource, and requires only `spec`.
    """
    schema: dict[str, Any] = _kubernetes_subset(copy.deepcopy(_schema()))
    props = schema["properties"]
    name_schema = props["metadata"]["properties"]["name"]
    props["metadata"] = {
        "type": "object",
        "description": props["metadata"].get("description", ""),
        "properties": {"name": name_schema},
    }
    props["status"] = {
        "type": "object",
        "description": "Observed state, written by the operator (phase, conditions, replicas).",
        "x-kubernetes-preserve-unknown-fields": True,
    }
    schema["required"] = ["spec"]
    return schema


# --- schema ---------------------------------------------------------------------------------


@cache
def _schema() -> dict[str, Any]:
    text = resources.files("orchestrator").joinpath("data", _SCHEMA_RESOURCE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _strict_integer(_checker: Any, instance: Any) -> bool:
    # JSON Schema counts 2.0 as an integer; a replica count written as 2.0 is a mistake.
    return isinstance(instance, int) and not isinstance(instance, bool)


_StrictValidator: Any = validators.extend(  # type: ignore[no-untyped-call]
    Draft202012Validator,
    type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _strict_integer),
)


@cache
def _validator() -> Any:
    return _StrictValidator(_schema())


def _kubernetes_subset(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key.startswith("$"):
                continue
            if key == "additionalProperties" and value is False:
                continue
            out[key] = _kubernetes_subset(value)
        return out
    if isinstance(node, list):
        return [_kubernetes_subset(v) for v in node]
    return node


def _apply_defaults(schema: Mapping[str, Any], instance: Any) -> None:
    """Fill absent properties from the schema's `default`s, as the Kubernetes API server does.

    Tolerant of wrong types (it only descends into mappings), so semantic checks can run on a
    document that also has schema errors.
    """
    if not isinstance(instance, dict):
        return
    for name, sub in schema.get("properties", {}).items():
        if name not in instance and "default" in sub:
            instance[name] = copy.deepcopy(sub["default"])
        if name in instance:
            _apply_defaults(sub, instance[name])


_TYPE_WORDS = {
    "integer": "an integer",
    "number": "a number",
    "string": "a string",
    "boolean": "true or false",
    "object": "a mapping",
    "array": "a list",
    "null": "null",
}

_PATTERN_HINTS = {
    "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$": (
        "must be a DNS-1123 label: lowercase letters, digits and '-', starting and ending with "
        "a letter or digit (e.g. 'llama3-70b')"
    ),
    "^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$": (
        "must be a valid label value: letters, digits, '-', '_' and '.', starting and ending "
        "with a letter or digit"
    ),
}

_MISSING_HINTS = {
    "metadata": "add metadata: {name: my-deployment}",
    "spec": "add a spec with at least model.preset or model.config",
    "model": "set model.preset (e.g. llama-3-8b) or model.config (a Hugging Face config.json)",
    "apiVersion": f"add apiVersion: {API_VERSION}",
    "kind": f"add kind: {KIND}",
}


def _did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    choices = list(choices)

    def norm(s: str) -> str:
        return s.lower().replace("_", "").replace("-", "").replace(".", "")

    for choice in choices:
        if norm(choice) == norm(word):
            return choice
    matches = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not matches:
        lowered = {c.lower(): c for c in choices}
        matches = [
            lowered[m]
            for m in difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
        ]
    return matches[0] if matches else None


def _enum_word(value: Any) -> str:
    return value if isinstance(value, str) else show_value(value)


# --- validation -----------------------------------------------------------------------------


def _base_dir(source: str, base_dir: Path | None) -> Path:
    if base_dir is not None:
        return Path(os.path.abspath(base_dir))
    if source and not source.startswith("<"):
        return Path(os.path.abspath(source)).parent
    return Path.cwd()


class _Context:
    """What every check needs to report an error: the source and the line map."""

    def __init__(self, source: str, lines: Mapping[tuple[Any, ...], int]) -> None:
        self.source = source
        self.lines = lines
        # did-you-mean costs a difflib scan; a hostile file with 100k unknown keys must not
        # turn that into minutes. The first ones get hints, the rest a plain message.
        self.hints_left = 100

    def line(self, path: Sequence[Any]) -> int | None:
        """The line of `path`, or of its nearest ancestor present in the file."""
        path = tuple(path)
        while True:
            if path in self.lines:
                return self.lines[path]
            if not path:
                return None
            path = path[:-1]

    def error(self, path: Sequence[Any], message: str) -> SpecError:
        return SpecError(message, file=self.source, line=self.line(path), field=format_path(path))


_KEYWORD_RANK = {"type": 0, "required": 0, "additionalProperties": 0, "enum": 1, "anyOf": 3}


def _schema_errors(doc: dict[str, Any], ctx: _Context) -> list[SpecError]:
    raw = sorted(_validator().iter_errors(doc), key=lambda e: _KEYWORD_RANK.get(e.validator, 2))
    out: list[SpecError] = []
    for err in raw:
        out.extend(_translate(err, ctx))
    return out


def _translate(err: ValidationError, ctx: _Context) -> list[SpecError]:
    path = tuple(err.absolute_path)
    keyword: Any = err.validator
    value: Any = err.validator_value
    instance: Any = err.instance
    schema: Any = err.schema
    if keyword == "additionalProperties" and isinstance(instance, dict):
        allowed = list(schema.get("properties", {}))
        out = []
        for key in instance:
            if key in allowed:
                continue
            if ctx.hints_left > 0:
                ctx.hints_left -= 1
                message = _unknown_field_message(key, allowed, path)
            else:
                message = f"unknown field {clip(key)!r}"
            out.append(ctx.error((*path, key), message))
        return out
    if keyword == "required" and isinstance(instance, dict):
        missing = [name for name in value if name not in instance]
        out = []
        for name in missing:
            message = f"required field '{name}' is missing"
            if name in _MISSING_HINTS:
                message += f"; {_MISSING_HINTS[name]}"
            err_path = (*path, name)
            out.append(
                SpecError(
                    message,
                    file=ctx.source,
                    line=ctx.line(path),
                    field=format_path(err_path),
                )
            )
        return out
    if keyword == "type":
        expected = [value] if isinstance(value, str) else list(value)
        words = " or ".join(_TYPE_WORDS.get(t, t) for t in expected)
        message = f"must be {words}, got {show_value(instance)}"
        if expected == ["string"] and isinstance(instance, bool | int | float | type(None)):
            message += " (quote it to write text)"
        return [ctx.error(path, message)]
    if keyword == "enum":
        choices = ", ".join(_enum_word(v) for v in value)
        message = f"must be one of: {choices}; got {show_value(instance)}"
        if isinstance(instance, str):
            hint = _did_you_mean(instance, [v for v in value if isinstance(v, str)])
            if hint is not None:
                message += f"; did you mean '{hint}'?"
        return [ctx.error(path, message)]
    if keyword == "minimum":
        return [ctx.error(path, f"must be at least {value}, got {show_value(instance)}")]
    if keyword == "maximum":
        return [ctx.error(path, f"must be at most {value}, got {show_value(instance)}")]
    if keyword == "minLength":
        message = "must not be empty" if value == 1 else f"must be at least {value} characters"
        return [ctx.error(path, message)]
    if keyword == "maxLength":
        return [ctx.error(path, f"must be at most {value} characters long, got {len(instance)}")]
    if keyword == "pattern":
        hint = _PATTERN_HINTS.get(value, "has an invalid format")
        return [ctx.error(path, f"{hint}; got {show_value(instance)}")]
    if keyword == "minItems":
        if path and path[-1] == "racks":
            return [ctx.error(path, "must list at least one rack; omit racks to use all racks")]
        return [ctx.error(path, f"must have at least {value} items")]
    if keyword == "maxItems":
        return [ctx.error(path, f"must have at most {value} items, got {len(instance)}")]
    if keyword == "anyOf":
        # A value of the right type for one branch failed that branch's own rule (a range,
        # an enum): say that, not "must be an integer or a string".
        for sub in err.context or ():
            branch = value[sub.relative_schema_path[0]]
            if sub.validator != "type" and _validator().is_type(instance, branch.get("type")):
                return _translate(sub, ctx)
        kinds = [b.get("type") for b in value if isinstance(b, dict)]
        if kinds and all(isinstance(k, str) for k in kinds):
            words = " or ".join(_TYPE_WORDS.get(str(k), str(k)) for k in kinds)
            return [ctx.error(path, f"must be {words}, got {show_value(instance)}")]
    return [ctx.error(path, f"has an invalid value {show_value(instance)}")]


def _unknown_field_message(key: str, allowed: list[str], path: tuple[Any, ...]) -> str:
    if not path and key == "status":
        return (
            "status must not appear in a deployment file: it is written by the controller "
            "(remove it)"
        )
    message = f"unknown field {clip(key)!r}"
    hint = _did_you_mean(key, allowed)
    if hint is not None:
        return f"{message}; did you mean '{hint}'?"
    # A field written at the wrong level is a common slip (indentation lost or added).
    elsewhere = _schema_field_paths()
    name = key if key in elsewhere else _did_you_mean(key, list(elsewhere))
    if name is not None:
        full = elsewhere[name]
        parent = full.rpartition(".")[0]
        return f"{message}; did you mean '{full}'? (it belongs under {parent})"
    return f"{message}; allowed fields: {', '.join(allowed)}"


@cache
def _schema_field_paths() -> dict[str, str]:
    """Every nested field name of the schema -> its dotted path (names are unique in it)."""
    out: dict[str, str] = {}

    def walk(schema: Mapping[str, Any], prefix: str) -> None:
        for name, sub in schema.get("properties", {}).items():
            full = f"{prefix}.{name}" if prefix else name
            if prefix:
                out.setdefault(name, full)
            walk(sub, full)

    walk(_schema(), "")
    return out


_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_MAX_ANNOTATIONS_BYTES = 256 * 1024


def _qualified_key_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes qualified name (`prefix/name`), or None if it is."""
    prefix, slash, name = key.rpartition("/")
    if slash and not prefix:
        return "the prefix before '/' must not be empty"
    if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return "the prefix before '/' must be a DNS subdomain (e.g. example.com)"
    if not name or len(name) > 63 or not _QUALIFIED_NAME.match(name):
        return (
            "the name must be 1-63 characters of letters, digits, '-', '_' and '.', starting "
            "and ending with a letter or digit"
        )
    return None


def _metadata_errors(doc: dict[str, Any], ctx: _Context) -> list[SpecError]:
    errors: list[SpecError] = []
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return errors
    for section in ("labels", "annotations"):
        entries = meta.get(section)
        if not isinstance(entries, dict):
            continue
        for key in entries:
            problem = _qualified_key_problem(key)
            if problem is not None:
                errors.append(
                    ctx.error(("metadata", section, key), f"invalid key {clip(key)!r}: {problem}")
                )
    annotations = meta.get("annotations")
    if isinstance(annotations, dict):
        size = sum(len(k) + len(v) for k, v in annotations.items() if isinstance(v, str))
        if size > _MAX_ANNOTATIONS_BYTES:
            errors.append(
                ctx.error(
                    ("metadata", "annotations"),
                    f"annotations total {size} bytes; Kubernetes allows at most 256 KiB",
                )
            )
    return errors


def _path_kind(path: str) -> str:
    """'file', 'dir', 'missing', 'other' — without raising for odd paths."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except (OSError, ValueError):
        return "unreadable"
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    return "other"


def _resolve(base_dir: Path, raw: str) -> str:
    return os.path.abspath(os.path.join(base_dir, raw))


class _ModelCheck:
    """Result of checking spec.model: the resolved model (when usable) and paths."""

    def __init__(self) -> None:
        self.model: ModelConfig | None = None
        self.config_path: str | None = None
        self.checkpoint_path: str | None = None


def _model_errors(
    spec: dict[str, Any], ctx: _Context, base_dir: Path, result: _ModelCheck
) -> list[SpecError]:
    model = spec.get("model")
    if not isinstance(model, dict):
        return []
    errors: list[SpecError] = []
    where = ("spec", "model")
    has_preset, has_config = "preset" in model, "config" in model
    if has_preset and has_config:
        errors.append(ctx.error(where, "set exactly one of preset or config, not both"))
    elif not has_preset and not has_config:
        errors.append(
            ctx.error(
                where,
                "set exactly one of preset (a built-in architecture, e.g. llama-3-8b) or config "
                "(a Hugging Face config.json); neither is set",
            )
        )
    preset = model.get("preset")
    if isinstance(preset, str) and preset:
        names = preset_names()
        if preset in names:
            if not has_config:
                result.model = model_preset(preset)
        else:
            message = f"unknown model preset {clip(preset)!r}"
            hint = _did_you_mean(preset, names)
            if hint is not None:
                message += f"; did you mean '{hint}'?"
            message += f" (known presets: {', '.join(names)})"
            errors.append(ctx.error((*where, "preset"), message))
    config = model.get("config")
    if isinstance(config, str) and config:
        path = _resolve(base_dir, config)
        result.config_path = path
        kind = _path_kind(path)
        field_path = (*where, "config")
        if kind == "missing":
            errors.append(ctx.error(field_path, f"model config file not found: {path}"))
        elif kind == "dir":
            errors.append(
                ctx.error(
                    field_path, f"model config must be a config.json file, got a directory: {path}"
                )
            )
        elif kind != "file":
            errors.append(
                ctx.error(field_path, f"model config is not a readable regular file: {path}")
            )
        else:
            try:
                loaded = model_from_hf_config(path)
            except InputError as exc:
                errors.append(ctx.error(field_path, f"invalid model config: {exc}"))
            except (ValueError, TypeError, OverflowError, RecursionError, OSError) as exc:
                errors.append(
                    ctx.error(
                        field_path, f"invalid model config {path}: {type(exc).__name__}: {exc}"
                    )
                )
            else:
                if not has_preset:
                    result.model = loaded
    checkpoint = model.get("checkpoint")
    if isinstance(checkpoint, str) and checkpoint:
        path = _resolve(base_dir, checkpoint)
        result.checkpoint_path = path
        kind = _path_kind(path)
        field_path = (*where, "checkpoint")
        if kind == "missing":
            errors.append(ctx.error(field_path, f"checkpoint directory not found: {path}"))
        elif kind != "dir":
            errors.append(
                ctx.error(
                    field_path,
                    f"checkpoint must be a directory of safetensors files, got a file: {path}"
                    if kind == "file"
                    else f"checkpoint is not a readable directory: {path}",
                )
            )
    return errors


def _semantic_errors(
    doc: dict[str, Any],
    original: dict[str, Any],
    ctx: _Context,
    base_dir: Path,
    result: _ModelCheck,
) -> list[SpecError]:
    """Rules the schema cannot express. `doc` has defaults applied; types may still be wrong."""
    errors: list[SpecError] = []
    api_version = doc.get("apiVersion")
    if isinstance(api_version, str) and api_version != API_VERSION:
        message = f"must be {API_VERSION}, got {show_value(api_version)}"
        if api_version.startswith("lpu.lockstep.dev/"):
            message += " (this Lockstep serves only v1alpha1)"
        errors.append(ctx.error(("apiVersion",), message))
    kind = doc.get("kind")
    if isinstance(kind, str) and kind != KIND:
        message = f"must be {KIND}, got {show_value(kind)}"
        if kind.lower() == KIND.lower():
            message += " (kinds are case-sensitive)"
        errors.append(ctx.error(("kind",), message))
    errors.extend(_metadata_errors(doc, ctx))
    spec = doc.get("spec")
    if not isinstance(spec, dict):
        return errors
    errors.extend(_model_errors(spec, ctx, base_dir, result))
    placement = spec.get("placement")
    racks = placement.get("racks") if isinstance(placement, dict) else None
    if isinstance(racks, list):
        seen: dict[str, int] = {}
        for index, rack in enumerate(racks):
            if not isinstance(rack, str):
                continue
            if rack in seen:
                first = seen[rack]
                first_line = ctx.lines.get(("spec", "placement", "racks", first))
                at = f"line {first_line}" if first_line is not None else f"racks[{first}]"
                errors.append(
                    ctx.error(
                        ("spec", "placement", "racks", index),
                        f"duplicate rack {clip(rack)!r} (already listed at {at})",
                    )
                )
            else:
                seen[rack] = index
    serving = spec.get("serving")
    max_context = serving.get("maxContext") if isinstance(serving, dict) else None
    model = result.model
    if (
        model is not None
        and isinstance(max_context, int)
        and not isinstance(max_context, bool)
        and max_context > model.max_position_embeddings
    ):
        limit = model.max_position_embeddings
        message = (
            f"{max_context} exceeds the model's context window ({limit} tokens, "
            f"max_position_embeddings of {model.name})"
        )
        original_spec = original.get("spec")
        original_serving = original_spec.get("serving") if isinstance(original_spec, dict) else None
        if not (isinstance(original_serving, dict) and "maxContext" in original_serving):
            message += f"; {max_context} is the default, set spec.serving.maxContext to at most "
            message += str(limit)
        errors.append(ctx.error(("spec", "serving", "maxContext"), message))
    return errors


def _dedupe(errors: Iterable[SpecError]) -> list[SpecError]:
    """One error per field: the first (schema errors come first, most specific keyword first)."""
    seen: set[str] = set()
    out = []
    for err in errors:
        key = err.field
        if key in seen:
            continue
        seen.add(key)
        out.append(err)
    return out


def _validate(
    doc: dict[str, Any],
    lines: Mapping[tuple[Any, ...], int],
    source: str,
    base_dir: Path,
) -> DeploymentSpec:
    ctx = _Context(source, lines)
    defaulted = copy.deepcopy(doc)
    _apply_defaults(_schema(), defaulted)
    result = _ModelCheck()
    errors = _schema_errors(doc, ctx)
    errors += _semantic_errors(defaulted, doc, ctx, base_dir, result)
    errors = _dedupe(errors)
    if errors:
        raise SpecError.combine(errors)
    return _build(defaulted, source, result)


def _build(doc: dict[str, Any], source: str, result: _ModelCheck) -> DeploymentSpec:
    """Turn a valid, defaulted document into the frozen spec (and its stored manifest)."""
    meta = doc["metadata"]
    spec = doc["spec"]
    model = spec["model"]
    if result.config_path is not None:
        model["config"] = result.config_path
    if result.checkpoint_path is not None:
        model["checkpoint"] = result.checkpoint_path
    serving, placement, failover = spec["serving"], spec["placement"], spec["failover"]
    tp = spec["parallelism"]["tensorParallel"]
    stages = spec["parallelism"]["pipelineStages"]
    racks = placement.get("racks")
    return DeploymentSpec(
        model=result.model,
        name=meta["name"],
        namespace=meta.get("namespace", _DEFAULT_NAMESPACE),
        model_preset=model.get("preset"),
        model_config_path=result.config_path,
        checkpoint_path=result.checkpoint_path,
        precision=spec["precision"],
        replicas=spec["replicas"],
        max_context=serving["maxContext"],
        max_batch=serving["maxBatch"],
        tensor_parallel=None if tp == "auto" else int(tp),
        pipeline_stages=None if stages == "auto" else int(stages),
        spread=placement["spread"],
        spares_per_rack=placement["sparesPerRack"],
        racks=tuple(racks) if racks is not None else None,
        max_restarts=failover["maxRestarts"],
        backoff_seconds=float(failover["backoffSeconds"]),
        verify_interval_seconds=float(spec["verification"]["intervalSeconds"]),
        canary_tokens=spec["verification"]["canaryTokens"],
        source=source,
        manifest=doc,
    )
