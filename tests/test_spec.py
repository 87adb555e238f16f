"""The deployment spec loader: good files normalize, every bad one names its field and line.

Each bad case is a different mistake a person (or an attacker) could make; every one asserts the
field and/or line of the single error it must produce and a fragment of the message. The cases
run through both the libyaml and the pure-Python composer, so the error contract does not depend
on how PyYAML was built.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import orchestrator.safe_yaml as safe_yaml
from orchestrator.spec import (
    API_VERSION,
    KIND,
    DeploymentSpec,
    SpecError,
    crd_openapi_schema,
    deployment_from_manifest,
    deployment_schema,
    load_deployment_file,
    parse_deployment,
    strip_server_fields,
)

REPO = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data" / "specs"
EXAMPLES = REPO / "manifests" / "examples"

TINY_HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 704,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}

# Line numbers of BASE matter: the cases below assert them.
BASE = """\
apiVersion: lpu.lockstep.dev/v1alpha1
kind: LPUDeployment
metadata:
  name: demo
spec:
  model:
    preset: llama-3-8b
  precision: int8
  replicas: 2
  serving:
    maxContext: 4096
    maxBatch: 8
  parallelism:
    tensorParallel: auto
  placement:
    spread: rack
    sparesPerRack: 1
    racks: [rack-0, rack-1]
  failover:
    maxRestarts: 5
    backoffSeconds: 1
"""
BASE_LINES = BASE.count("\n")


def variant(*pairs: str, base: str = BASE) -> str:
    """BASE with each (old, new) pair replaced once; fails loudly if `old` is not there."""
    text = base
    for old, new in zip(pairs[::2], pairs[1::2], strict=True):
        assert old in text, old
        text = text.replace(old, new, 1)
    return text


class Bad(NamedTuple):
    id: str
    text: str | bytes
    field: str | None  # None: do not check (whole-file problems have "")
    line: int | None  # None: the error must carry no line
    fragment: str
    files: Mapping[str, str] = MappingProxyType({})  # extra files next to the deployment


BAD_CASES = [
    # --- unknown fields -----------------------------------------------------------------
    Bad(
        "unknown-top-level-field",
        BASE + "extras: 1\n",
        "extras",
        22,
        "unknown field 'extras'; allowed fields: apiVersion, kind, metadata, spec",
    ),
    Bad(
        "spec-field-at-top-level",
        BASE + "maxRestart: 3\n",
        "maxRestart",
        22,
        "did you mean 'spec.failover.maxRestarts'? (it belongs under spec.failover)",
    ),
    Bad(
        "typo-nested-field",
        variant("maxBatch: 8", "maxBtach: 8"),
        "spec.serving.maxBtach",
        12,
        "unknown field 'maxBtach'; did you mean 'maxBatch'?",
    ),
    Bad(
        "snake-case-field",
        variant("tensorParallel:", "tensor_parallel:"),
        "spec.parallelism.tensor_parallel",
        14,
        "did you mean 'tensorParallel'?",
    ),
    Bad(
        "unknown-metadata-field",
        variant("  name: demo\n", "  name: demo\n  uid: abc\n"),
        "metadata.uid",
        5,
        "unknown field 'uid'",
    ),
    Bad(
        "status-present",
        BASE + "status:\n  phase: Ready\n",
        "status",
        22,
        "written by the controller",
    ),
    # --- types and ranges ---------------------------------------------------------------
    Bad(
        "replicas-word",
        variant("replicas: 2", "replicas: two"),
        "spec.replicas",
        9,
        "must be an integer, got 'two'",
    ),
    Bad(
        "replicas-yaml11-bool",
        variant("replicas: 2", "replicas: yes"),
        "spec.replicas",
        9,
        "must be an integer, got true",
    ),
    Bad(
        "replicas-float",
        variant("replicas: 2", "replicas: 2.5"),
        "spec.replicas",
        9,
        "must be an integer, got 2.5",
    ),
    Bad(
        "replicas-zero",
        variant("replicas: 2", "replicas: 0"),
        "spec.replicas",
        9,
        "must be at least 1, got 0",
    ),
    Bad(
        "replicas-too-many",
        variant("replicas: 2", "replicas: 5000"),
        "spec.replicas",
        9,
        "must be at most 1024, got 5000",
    ),
    Bad(
        "max-context-zero",
        variant("maxContext: 4096", "maxContext: 0"),
        "spec.serving.maxContext",
        11,
        "must be at least 1, got 0",
    ),
    Bad(
        "max-batch-too-big",
        variant("maxBatch: 8", "maxBatch: 10000"),
        "spec.serving.maxBatch",
        12,
        "must be at most 4096, got 10000",
    ),
    Bad(
        "serving-not-a-mapping",
        variant("  serving:\n    maxContext: 4096\n    maxBatch: 8\n", "  serving: 8\n"),
        "spec.serving",
        10,
        "must be a mapping, got 8",
    ),
    Bad(
        "precision-enum",
        variant("precision: int8", "precision: int4"),
        "spec.precision",
        8,
        "must be one of: fp16, bf16, fp8, int8; got 'int4'",
    ),
    Bad(
        "spread-enum-typo",
        variant("spread: rack", "spread: racks"),
        "spec.placement.spread",
        16,
        "did you mean 'rack'?",
    ),
    Bad(
        "spares-negative",
        variant("sparesPerRack: 1", "sparesPerRack: -1"),
        "spec.placement.sparesPerRack",
        17,
        "must be at least 0, got -1",
    ),
    Bad(
        "max-restarts-too-big",
        variant("maxRestarts: 5", "maxRestarts: 2000"),
        "spec.failover.maxRestarts",
        20,
        "must be at most 1000",
    ),
    Bad(
        "backoff-with-unit",
        variant("backoffSeconds: 1", "backoffSeconds: 1s"),
        "spec.failover.backoffSeconds",
        21,
        "must be a number, got '1s'",
    ),
    Bad(
        "backoff-too-long",
        variant("backoffSeconds: 1", "backoffSeconds: 4000"),
        "spec.failover.backoffSeconds",
        21,
        "must be at most 3600",
    ),
    Bad(
        "tensor-parallel-3",
        variant("tensorParallel: auto", "tensorParallel: 3"),
        "spec.parallelism.tensorParallel",
        14,
        "must be one of: auto, 1, 2, 4, 8; got 3",
    ),
    Bad(
        "tensor-parallel-8x",
        variant("tensorParallel: auto", "tensorParallel: 8x"),
        "spec.parallelism.tensorParallel",
        14,
        "got '8x'",
    ),
    Bad(
        "tensor-parallel-capitalized",
        variant("tensorParallel: auto", "tensorParallel: Auto"),
        "spec.parallelism.tensorParallel",
        14,
        "did you mean 'auto'?",
    ),
    # --- metadata -----------------------------------------------------------------------
    Bad(
        "missing-name",
        variant("  name: demo\n", "  namespace: prod\n"),
        "metadata.name",
        3,
        "required field 'name' is missing",
    ),
    Bad(
        "name-pattern",
        variant("name: demo", "name: Demo_1"),
        "metadata.name",
        4,
        "must be a DNS-1123 label",
    ),
    Bad(
        "name-too-long",
        variant("name: demo", "name: " + "a" * 64),
        "metadata.name",
        4,
        "must be at most 63 characters long, got 64",
    ),
    Bad(
        "namespace-pattern",
        variant("  name: demo\n", "  name: demo\n  namespace: Prod\n"),
        "metadata.namespace",
        5,
        "DNS-1123",
    ),
    Bad(
        "label-key-invalid",
        variant("  name: demo\n", '  name: demo\n  labels: {"-bad": x}\n'),
        'metadata.labels["-bad"]',
        5,
        "invalid key '-bad'",
    ),
    Bad(
        "label-value-bool",
        variant("  name: demo\n", "  name: demo\n  labels: {enabled: true}\n"),
        "metadata.labels.enabled",
        5,
        "must be a string, got true (quote it",
    ),
    Bad(
        "missing-metadata",
        variant("metadata:\n  name: demo\n", ""),
        "metadata",
        1,
        "required field 'metadata' is missing",
    ),
    # --- apiVersion / kind --------------------------------------------------------------
    Bad(
        "missing-api-version",
        variant(f"apiVersion: {API_VERSION}\n", ""),
        "apiVersion",
        1,
        "required field 'apiVersion' is missing",
    ),
    Bad(
        "wrong-api-version",
        variant(API_VERSION, "apps/v1"),
        "apiVersion",
        1,
        f"must be {API_VERSION}, got 'apps/v1'",
    ),
    Bad(
        "wrong-kind",
        variant(f"kind: {KIND}", "kind: Deployment"),
        "kind",
        2,
        "must be LPUDeployment, got 'Deployment'",
    ),
    # --- model --------------------------------------------------------------------------
    Bad(
        "missing-model",
        variant("  model:\n    preset: llama-3-8b\n", ""),
        "spec.model",
        5,
        "required field 'model' is missing",
    ),
    Bad(
        "preset-and-config",
        variant("    preset: llama-3-8b\n", "    preset: llama-3-8b\n    config: config.json\n"),
        "spec.model",
        6,
        "exactly one of preset or config, not both",
        {"config.json": json.dumps(TINY_HF_CONFIG)},
    ),
    Bad(
        "neither-preset-nor-config",
        variant("  model:\n    preset: llama-3-8b\n", "  model: {}\n"),
        "spec.model",
        6,
        "neither is set",
    ),
    Bad(
        "unknown-preset",
        variant("preset: llama-3-8b", "preset: llama3-8b"),
        "spec.model.preset",
        7,
        "unknown model preset 'llama3-8b'; did you mean 'llama-3-8b'?",
    ),
    Bad(
        "preset-number",
        variant("preset: llama-3-8b", "preset: 8"),
        "spec.model.preset",
        7,
        "must be a string, got 8",
    ),
    Bad(
        "config-missing",
        variant("preset: llama-3-8b", "config: nope/config.json"),
        "spec.model.config",
        7,
        "model config file not found",
    ),
    Bad(
        "config-invalid-json",
        variant("preset: llama-3-8b", "config: bad.json"),
        "spec.model.config",
        7,
        "bad.json:3: invalid JSON",
        {"bad.json": '{\n  "model_type": "llama",\n  oops\n}\n'},
    ),
    Bad(
        "config-unsupported-model-type",
        variant("preset: llama-3-8b", "config: gpt2.json"),
        "spec.model.config",
        7,
        "unsupported model_type 'gpt2'",
        {"gpt2.json": json.dumps({**TINY_HF_CONFIG, "model_type": "gpt2"})},
    ),
    Bad(
        "config-is-a-directory",
        variant("preset: llama-3-8b", "config: ."),
        "spec.model.config",
        7,
        "got a directory",
    ),
    Bad(
        "checkpoint-missing",
        variant("    preset: llama-3-8b\n", "    preset: llama-3-8b\n    checkpoint: weights\n"),
        "spec.model.checkpoint",
        8,
        "checkpoint directory not found",
    ),
    Bad(
        "checkpoint-is-a-file",
        variant("    preset: llama-3-8b\n", "    preset: llama-3-8b\n    checkpoint: w.bin\n"),
        "spec.model.checkpoint",
        8,
        "must be a directory",
        {"w.bin": "not weights"},
    ),
    Bad(
        "max-context-above-model",
        variant("maxContext: 4096", "maxContext: 16384"),
        "spec.serving.maxContext",
        11,
        "exceeds the model's context window (8192 tokens",
    ),
    Bad(
        "default-max-context-above-model",
        variant(
            "llama-3-8b", "tiny-llama", "  serving:\n    maxContext: 4096\n    maxBatch: 8\n", ""
        ),
        "spec.serving.maxContext",
        5,
        "2048 is the default",
    ),
    # --- placement ----------------------------------------------------------------------
    Bad(
        "duplicate-racks",
        variant("[rack-0, rack-1]", "[rack-0, rack-1, rack-0]"),
        "spec.placement.racks[2]",
        18,
        "duplicate rack 'rack-0'",
    ),
    Bad(
        "empty-racks",
        variant("[rack-0, rack-1]", "[]"),
        "spec.placement.racks",
        18,
        "must list at least one rack",
    ),
    Bad(
        "rack-name-pattern",
        variant("[rack-0, rack-1]", "[rack-0, Rack_1]"),
        "spec.placement.racks[1]",
        18,
        "DNS-1123",
    ),
    Bad(
        "racks-not-a-list",
        variant("[rack-0, rack-1]", "rack-0"),
        "spec.placement.racks",
        18,
        "must be a list, got 'rack-0'",
    ),
    # --- YAML: hostile or broken --------------------------------------------------------
    Bad(
        "duplicate-key",
        variant("  replicas: 2\n", "  replicas: 2\n  replicas: 3\n"),
        "spec.replicas",
        10,
        "duplicate key 'replicas' (first defined at line 9)",
    ),
    Bad(
        "anchor-and-alias",
        variant("maxContext: 4096", "maxContext: &n 4096", "maxBatch: 8", "maxBatch: *n"),
        None,
        11,
        "YAML aliases/anchors are not allowed",
    ),
    Bad(
        "binary-tag",
        variant("preset: llama-3-8b", "preset: !!binary bGxhbWE="),
        "",
        7,
        "YAML tag '!!binary' is not allowed",
    ),
    Bad(
        "python-tag",
        variant("replicas: 2", "replicas: !!python/object/apply:os.getpid []"),
        "",
        9,
        "'!!python/object/apply:os.getpid' is not allowed",
    ),
    Bad(
        "custom-tag",
        variant("precision: int8", "precision: !secret int8"),
        "",
        8,
        "YAML tag '!secret' is not allowed",
    ),
    Bad(
        "huge-integer",
        variant("replicas: 2", "replicas: 18446744073709551616"),
        "spec.replicas",
        9,
        "is out of range",
    ),
    Bad(
        "infinity",
        variant("backoffSeconds: 1", "backoffSeconds: .inf"),
        "spec.failover.backoffSeconds",
        21,
        "non-finite number .inf",
    ),
    Bad(
        "not-a-number",
        variant("backoffSeconds: 1", "backoffSeconds: .NaN"),
        "spec.failover.backoffSeconds",
        21,
        "non-finite number .NaN",
    ),
    Bad(
        "key-read-as-bool",
        variant("  replicas: 2\n", "  replicas: 2\n  on: true\n"),
        "spec",
        10,
        'quote it ("on")',
    ),
    Bad("nul-byte", variant("name: demo", "name: de\x00mo").encode(), "", 4, "NUL byte"),
    Bad(
        "not-utf8",
        variant("name: demo", "name: caf\xe9").encode("latin-1"),
        "",
        4,
        "not valid UTF-8",
    ),
    Bad(
        "control-character",
        variant("name: demo", "name: \x1b[31mdemo"),
        "",
        4,
        "control character U+001B",
    ),
    Bad("empty-file", "", "", 1, "file is empty"),
    Bad("only-comments", "# nothing yet\n\n", "", 1, "file is empty"),
    Bad(
        "top-level-list",
        "- " + BASE.replace("\n", "\n  ", BASE_LINES - 1),
        "",
        1,
        "top level must be a mapping",
    ),
    Bad("top-level-scalar", "llama-3-70b please\n", "", 1, "got a scalar"),
    Bad("multiple-documents", BASE + "---\n" + BASE, "", 22, "more than one YAML document"),
    Bad(
        "tab-indentation",
        variant("    preset:", "\tpreset:"),
        "",
        7,
        "YAML does not allow tabs for indentation",
    ),
    Bad(
        "unclosed-flow-list",
        variant("[rack-0, rack-1]", "[rack-0, rack-1"),
        "",
        19,
        "YAML syntax error",
    ),
    Bad(
        "too-deep",
        variant("replicas: 2", "replicas: " + "[" * 40 + "]" * 40),
        "",
        9,
        "nesting is too deep",
    ),
    Bad("over-1-mib", BASE + "# " + "x" * (1 << 20) + "\n", "", None, "file is too large"),
]


# The pure-Python composer always; the C (libyaml) one too where PyYAML was built with it.
_LOADERS = {"python": safe_yaml._PyLoader} | (
    {"libyaml": safe_yaml._CLoader} if hasattr(safe_yaml, "_CLoader") else {}
)


@pytest.fixture(params=sorted(_LOADERS))
def loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with every composer this PyYAML offers."""
    monkeypatch.setattr(safe_yaml, "_Loader", _LOADERS[request.param])
    yield request.param


def write_case(tmp_path: Path, text: str | bytes, files: Mapping[str, str]) -> Path:
    for name, content in files.items():
        (tmp_path / name).write_text(content)
    path = tmp_path / "deploy.yaml"
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def expect_one(exc: SpecError, field: str | None, line: int | None, fragment: str) -> SpecError:
    assert len(exc.errors) == 1, f"expected one error, got:\n{exc}"
    err = exc.errors[0]
    if field is not None:
        assert err.field == field, str(err)
    assert err.line == line, str(err)
    assert fragment in err.message, str(err)
    return err


def test_there_are_enough_distinct_bad_cases() -> None:
    assert len(BAD_CASES) >= 35
    assert len({case.id for case in BAD_CASES}) == len(BAD_CASES)
    assert len({case.text for case in BAD_CASES}) == len(BAD_CASES)


def test_base_is_valid() -> None:
    spec = parse_deployment(BASE, "base.yaml")
    assert spec.replicas == 2 and spec.racks == ("rack-0", "rack-1")


@pytest.mark.parametrize("case", BAD_CASES, ids=lambda c: c.id)
def test_bad_input_names_field_and_line(case: Bad, tmp_path: Path, loader: str) -> None:
    path = write_case(tmp_path, case.text, case.files)
    with pytest.raises(SpecError) as info:
        load_deployment_file(path)
    err = expect_one(info.value, case.field, case.line, case.fragment)
    assert err.file == str(path)
    assert str(err).startswith(str(path))
    assert "Traceback" not in str(err) and "jsonschema" not in str(err)


BAD_FILES = {
    "billion-laughs.yaml": ("", 7, "YAML aliases/anchors are not allowed (found anchor '&a')"),
    "python-object.yaml": ("", 7, "'!!python/object/apply:os.system' is not allowed"),
    "binary-tag.yaml": ("", 8, "'!!binary' is not allowed"),
    "duplicate-keys.yaml": ("spec.replicas", 10, "duplicate key 'replicas'"),
    "tabs.yaml": ("", 7, "tabs"),
    "multi-doc.yaml": ("", 7, "more than one YAML document"),
    "status.yaml": ("status", 7, "must not appear in a deployment file"),
    "latin1.yaml": ("", 4, "not valid UTF-8 text (invalid byte 0xe9)"),
    "png-garbage.yaml": ("", 3, "NUL byte"),
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_files(name: str, loader: str) -> None:
    field, line, fragment = BAD_FILES[name]
    with pytest.raises(SpecError) as info:
        load_deployment_file(DATA / "bad" / name)
    expect_one(info.value, field, line, fragment)


def test_every_bad_data_file_is_covered() -> None:
    assert sorted(p.name for p in (DATA / "bad").iterdir()) == sorted(BAD_FILES)


# --- file-level errors ----------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        load_deployment_file(tmp_path / "nope.yaml")
    assert str(info.value) == f"{tmp_path / 'nope.yaml'}: file not found"


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory"):
        load_deployment_file(tmp_path)


def test_text_over_limit_is_refused_before_parsing() -> None:
    with pytest.raises(SpecError, match="too large"):
        parse_deployment("a" * ((1 << 20) + 1), "big.yaml")


# --- good files -----------------------------------------------------------------------------


def test_minimal_file_gets_every_default() -> None:
    spec = load_deployment_file(DATA / "good" / "minimal.yaml")
    assert spec == DeploymentSpec(
        name="minimal",
        namespace="default",
        model_preset="llama-3-8b",
        model_config_path=None,
        checkpoint_path=None,
        precision="fp16",
        replicas=1,
        max_context=2048,
        max_batch=1,
        tensor_parallel=None,
        spread="rack",
        spares_per_rack=1,
        racks=None,
        max_restarts=5,
        backoff_seconds=1.0,
        source=str(DATA / "good" / "minimal.yaml"),
    )
    manifest = spec.to_manifest()
    assert manifest["spec"] == {
        "model": {"preset": "llama-3-8b"},
        "precision": "fp16",
        "replicas": 1,
        "serving": {"maxContext": 2048, "maxBatch": 1},
        "parallelism": {"tensorParallel": "auto", "pipelineStages": "auto"},
        "placement": {"spread": "rack", "sparesPerRack": 1},
        "failover": {"maxRestarts": 5, "backoffSeconds": 1},
        "verification": {"intervalSeconds": 300, "canaryTokens": 4},
    }


def test_dataclass_defaults_match_schema_defaults() -> None:
    parsed = parse_deployment(
        f"apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata: {{name: x}}\n"
        "spec: {model: {preset: llama-3-8b}}\n",
        "<test>",
    )
    assert parsed == DeploymentSpec(name="x", model_preset="llama-3-8b", source="<test>")


def test_full_file() -> None:
    spec = load_deployment_file(DATA / "good" / "full.yaml")
    assert spec.name == "llama3-70b" and spec.namespace == "inference"
    assert spec.model_preset == "llama-3-70b" and spec.precision == "int8"
    assert (spec.replicas, spec.max_context, spec.max_batch) == (2, 4096, 8)
    assert spec.tensor_parallel == 8 and spec.spread == "rack" and spec.spares_per_rack == 1
    assert spec.racks == ("rack-0", "rack-1")
    assert (spec.max_restarts, spec.backoff_seconds) == (7, 0.5)
    assert spec.manifest["metadata"]["labels"]["app.kubernetes.io/name"] == "llama3-70b"


def test_hf_config_and_checkpoint_resolve_against_the_file_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = tmp_path / "models" / "tiny"
    (model_dir / "weights").mkdir(parents=True)
    (model_dir / "config.json").write_text(json.dumps(TINY_HF_CONFIG))
    deploy_dir = tmp_path / "deploy"
    deploy_dir.mkdir()
    (deploy_dir / "tiny.yaml").write_text(
        variant(
            "preset: llama-3-8b",
            "config: ../models/tiny/config.json\n    checkpoint: ../models/tiny/weights",
            "maxContext: 4096",
            "maxContext: 1024",
        )
    )
    monkeypatch.chdir(tmp_path)  # must not matter
    spec = load_deployment_file("deploy/tiny.yaml")
    assert spec.model_preset is None
    assert spec.model_config_path == str(model_dir / "config.json")
    assert spec.checkpoint_path == str(model_dir / "weights")
    assert spec.manifest["spec"]["model"]["config"] == str(model_dir / "config.json")
    # The HF config has no max_position_embeddings: transformers' LlamaConfig default (2048)
    # applies, as it would when transformers loads the file.
    with pytest.raises(SpecError, match=r"context window \(2048 tokens"):
        parse_deployment(
            variant("preset: llama-3-8b", "config: config.json", "4096", "5000"),
            "<stdin>",
            base_dir=model_dir,
        )


def test_round_trip_through_stored_manifest(tmp_path: Path) -> None:
    spec = load_deployment_file(DATA / "good" / "full.yaml")
    again = parse_deployment(yaml.safe_dump(spec.to_manifest()), "stored.yaml")
    assert again == dataclasses.replace(spec, source="stored.yaml")
    assert again.to_manifest() == spec.to_manifest()
    synthesized = dataclasses.replace(spec, manifest={}).to_manifest()
    assert deployment_from_manifest(synthesized) == dataclasses.replace(spec, source="<manifest>")


def test_to_manifest_is_a_copy() -> None:
    spec = parse_deployment(BASE, "base.yaml")
    spec.to_manifest()["spec"]["replicas"] = 99
    assert spec.to_manifest()["spec"]["replicas"] == 2


def test_kubernetes_object_after_stripping_server_fields() -> None:
    obj = yaml.safe_load(BASE)
    obj["metadata"].update(uid="1234", resourceVersion="7", namespace="prod")
    obj["status"] = {"phase": "Ready"}
    with pytest.raises(SpecError) as info:
        deployment_from_manifest(obj)
    assert {e.field for e in info.value.errors} == {
        "metadata.uid",
        "metadata.resourceVersion",
        "status",
    }
    assert all(e.line is None for e in info.value.errors)
    spec = deployment_from_manifest(strip_server_fields(obj), "k8s:prod/demo")
    assert spec.namespace == "prod" and spec.source == "k8s:prod/demo"


def test_manifest_data_with_unsafe_values() -> None:
    obj = yaml.safe_load(BASE)
    obj["spec"]["replicas"] = 2**60
    obj["spec"]["failover"]["backoffSeconds"] = float("nan")
    with pytest.raises(SpecError) as info:
        deployment_from_manifest(obj)
    assert [e.field for e in info.value.errors] == [
        "spec.failover.backoffSeconds",
        "spec.replicas",
    ]


def deployment_examples() -> list[Path]:
    """Example files that declare an LPUDeployment (the folder also holds other kinds)."""
    return sorted(
        p
        for p in EXAMPLES.glob("*.yaml")
        if re.search(r"^kind:\s*LPUDeployment\s*$", p.read_text(encoding="utf-8"), re.M)
    )


@pytest.mark.parametrize("path", deployment_examples(), ids=lambda p: p.name)
def test_every_example_manifest_validates(path: Path) -> None:
    spec = load_deployment_file(path)
    assert spec.name == path.stem


def test_examples_exist() -> None:
    names = {p.name for p in deployment_examples()}
    assert {"tiny-llama.yaml", "llama3-70b.yaml"} <= names
    tiny = load_deployment_file(EXAMPLES / "tiny-llama.yaml")
    assert (tiny.model_preset, tiny.replicas, tiny.max_context, tiny.max_batch) == (
        "tiny-llama",
        2,
        256,
        4,
    )


# --- several errors at once -----------------------------------------------------------------


def test_all_errors_reported_at_once_sorted_by_line(tmp_path: Path) -> None:
    text = variant(
        "kind: LPUDeployment",
        "kind: Deployment",
        "racks: [rack-0, rack-1]",
        "racks: [rack-0, rack-0]",
        "replicas: 2",
        "replica: 2",
        "precision: int8",
        "precision: int4",
        "backoffSeconds: 1",
        "backoffSeconds: -2",
        "name: demo",
        "name: Demo",
    )
    path = write_case(tmp_path, text, {})
    with pytest.raises(SpecError) as info:
        load_deployment_file(path)
    exc = info.value
    got = [(e.line, e.field) for e in exc.errors]
    assert got == [
        (2, "kind"),
        (4, "metadata.name"),
        (8, "spec.precision"),
        (9, "spec.replica"),
        (18, "spec.placement.racks[1]"),
        (21, "spec.failover.backoffSeconds"),
    ]
    lines = str(exc).splitlines()
    assert len(lines) == 6
    assert lines[0] == f"{path}:2: kind: must be LPUDeployment, got 'Deployment'"
    assert lines[3] == f"{path}:9: spec.replica: unknown field 'replica'; did you mean 'replicas'?"
    assert (exc.line, exc.field) == (2, "kind")


def test_spec_error_format_and_pickle() -> None:
    assert str(SpecError("boom")) == "boom"
    assert str(SpecError("boom", file="f.yaml")) == "f.yaml: boom"
    assert str(SpecError("boom", file="f.yaml", field="spec")) == "f.yaml: spec: boom"
    assert str(SpecError("boom", file="f.yaml", line=3, field="spec")) == "f.yaml:3: spec: boom"
    one = SpecError("b", file="f", line=9, field="x")
    two = SpecError("a", file="f", line=2, field="y")
    both = SpecError.combine([one, two])
    assert both.errors == [two, one] and str(both) == "f:2: y: a\nf:9: x: b"
    for err in (one, both):
        copy = pickle.loads(pickle.dumps(err))
        assert str(copy) == str(err) and (copy.line, copy.field) == (err.line, err.field)


# --- schema and CRD -------------------------------------------------------------------------


def walk_properties(schema: dict[str, Any], path: str = "") -> Iterator[tuple[str, Any]]:
    for name, sub in schema.get("properties", {}).items():
        yield f"{path}.{name}".lstrip("."), sub
        yield from walk_properties(sub, f"{path}.{name}")
    items = schema.get("items")
    if isinstance(items, dict):
        yield from walk_properties(items, f"{path}[]")


def test_every_schema_field_is_described() -> None:
    missing = [p for p, sub in walk_properties(deployment_schema()) if not sub.get("description")]
    assert missing == []


def test_crd_schema_is_the_kubernetes_subset() -> None:
    crd = crd_openapi_schema()
    text = json.dumps(crd)
    assert "$schema" not in text and "$id" not in text and "$comment" not in text
    assert '"additionalProperties": false' not in text
    assert "uniqueItems" not in text and "oneOf" not in text
    assert crd["properties"]["metadata"]["properties"].keys() == {"name"}
    assert crd["properties"]["status"]["x-kubernetes-preserve-unknown-fields"] is True
    tp = crd["properties"]["spec"]["properties"]["parallelism"]["properties"]["tensorParallel"]
    assert tp["x-kubernetes-int-or-string"] is True and tp["default"] == "auto"
    spec_props = crd["properties"]["spec"]["properties"]
    assert spec_props["serving"]["properties"]["maxContext"]["default"] == 2048
    assert spec_props["placement"]["properties"]["sparesPerRack"]["default"] == 1
    # The file schema itself is untouched.
    assert deployment_schema()["additionalProperties"] is False


# --- fuzzing: nothing but SpecError ever escapes --------------------------------------------

YAML_NOISE = st.one_of(
    st.text(
        alphabet=" \t\n-:?[]{},#&*!|>'\"%@`~.0123456789eEaz_\\\x00\x85\ufeffé",
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["!!binary ", "*a", "&a ", "---\n", "1e9", ".inf", "!!int ", "? ", "<<: "]),
)
FUZZ_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def parse_quietly(text: str | bytes) -> None:
    try:
        parse_deployment(text, "<fuzz>", base_dir=DATA)
    except SpecError as exc:
        assert exc.errors and str(exc)


@FUZZ_SETTINGS
@given(st.data())
def test_mutated_yaml_raises_only_spec_error(data: st.DataObject) -> None:
    text = BASE
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        op = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        noise = data.draw(YAML_NOISE)
        if op == "insert":
            text = text[:pos] + noise + text[pos:]
        elif op == "delete":
            text = text[:pos] + text[pos + len(noise) :]
        else:
            text = text[:pos] + noise + text[pos + len(noise) :]
    parse_quietly(text)


@FUZZ_SETTINGS
@given(st.text(max_size=200))
def test_random_text_raises_only_spec_error(text: str) -> None:
    parse_quietly(text)


@FUZZ_SETTINGS
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_spec_error(blob: bytes) -> None:
    parse_quietly(blob)


@pytest.mark.parametrize(
    ("value", "expected", "fragment"),
    [
        ("auto", None, None),
        ("12", 12, None),
        ("0", None, "must be at least 1, got 0"),
        ("100001", None, "must be at most 100000"),
        ("many", None, "must be one of: auto; got 'many'"),
        ("2.5", None, "must be an integer or a string, got 2.5"),
    ],
)
def test_pipeline_stages(value: str, expected: int | None, fragment: str | None) -> None:
    text = BASE.replace(
        "    tensorParallel: auto\n", f"    tensorParallel: auto\n    pipelineStages: {value}\n"
    )
    if fragment is None:
        assert parse_deployment(text, "p.yaml").pipeline_stages == expected
        return
    with pytest.raises(SpecError) as info:
        parse_deployment(text, "p.yaml")
    err = expect_one(info.value, "spec.parallelism.pipelineStages", 15, fragment)
    assert err.file == "p.yaml"


@pytest.mark.parametrize(
    ("block", "field", "message"),
    [
        ("{intervalSeconds: -1}", "spec.verification.intervalSeconds", "at least 0"),
        ("{intervalSeconds: 100000}", "spec.verification.intervalSeconds", "at most 86400"),
        ("{intervalSeconds: 5m}", "spec.verification.intervalSeconds", "must be a number"),
        ("{canaryTokens: 0}", "spec.verification.canaryTokens", "at least 1"),
        ("{canaryTokens: 65}", "spec.verification.canaryTokens", "at most 64"),
        ("{canaryTokens: 2.5}", "spec.verification.canaryTokens", "integer"),
        ("{canaryTokns: 4}", "spec.verification", "canaryTokns"),
    ],
)
def test_bad_verification_fields_name_the_field(block: str, field: str, message: str) -> None:
    text = (
        f"apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata: {{name: x}}\n"
        f"spec:\n  model: {{preset: llama-3-8b}}\n  verification: {block}\n"
    )
    with pytest.raises(SpecError) as info:
        parse_deployment(text, "<test>")
    assert field in str(info.value)
    assert message in str(info.value)


def test_verification_fields_are_read() -> None:
    text = (
        f"apiVersion: {API_VERSION}\nkind: {KIND}\nmetadata: {{name: x}}\n"
        "spec:\n  model: {preset: llama-3-8b}\n"
        "  verification: {intervalSeconds: 0, canaryTokens: 9}\n"
    )
    spec = parse_deployment(text, "<test>")
    assert (spec.verify_interval_seconds, spec.canary_tokens) == (0.0, 9)
    assert spec.to_manifest()["spec"]["verification"] == {"intervalSeconds": 0, "canaryTokens": 9}
