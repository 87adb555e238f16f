"""The shard format (`shardformat`): codec, manifest and content address, without processes.

Whatever bytes arrive, parsing either succeeds or raises `ExecutionError` with a message: the
fuzz tests feed random bytes, mutated valid headers and mutated valid manifests and accept no
other exception.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from placement.models import MODEL_PRESETS
from shardformat.address import file_shard_id, shard_id_of
from shardformat.codec import (
    MAX_TENSOR_BYTES,
    encode_header,
    encode_safetensors,
    parse_header,
    parse_safetensors,
)
from shardformat.errors import ExecutionError
from shardformat.layout import whole_layout
from shardformat.manifest import FORMAT, MANIFEST_KEY, Manifest, TensorInfo

TINY = MODEL_PRESETS["tiny-llama"]
FUZZ = settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "300")),  # more for a longer hunt
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def blob_of(header: Any, data: bytes = b"") -> bytes:
    """A blob with `header` (any JSON value) as its header text and `data` after it."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def valid_blob() -> bytes:
    return encode_safetensors(
        {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int8)},
        {"k": "v"},
    )


def valid_manifest(virtual: bool = False) -> Manifest:
    digest = None if virtual else "ab" * 32
    return Manifest(
        model_name=TINY.name,
        config=TINY,
        precision="fp16",
        stage=0,
        stages=1,
        tick_offset=0,
        tp_rank=0,
        tp_size=1,
        max_batch=2,
        max_context=32,
        ops=tuple(whole_layout(TINY)),
        tensors={
            "model.norm.weight": TensorInfo(
                "F16", (TINY.hidden_size,), "model.norm.weight", None, (0, 0), digest
            )
        },
        virtual=virtual,
        declared_bytes=1 << 20,
        weight_bytes=2 * TINY.hidden_size,
    )


# --- codec -------------------------------------------------------------------------------------


def test_codec_round_trips_with_the_safetensors_package() -> None:
    arrays = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.arange(4, dtype=np.int8)}
    ours = encode_safetensors(arrays, {"k": "v"})
    for name, array in st_load(ours).items():
        assert np.array_equal(array, arrays[name]) and array.dtype == arrays[name].dtype
    theirs = parse_safetensors(st_save(arrays, metadata={"k": "v"}))
    assert theirs.metadata == {"k": "v"}
    for name, array in theirs.tensors.items():
        assert np.array_equal(array, arrays[name])


def _entry(dtype: str = "F32", shape: Any = None, offsets: Any = None) -> dict[str, Any]:
    return {
        "dtype": dtype,
        "shape": [2] if shape is None else shape,
        "data_offsets": [0, 8] if offsets is None else offsets,
    }


@pytest.mark.parametrize(
    ("blob", "match"),
    [
        (b"", "shorter than its 8-byte"),
        (struct.pack("<Q", 2**63) + b"{}", "header length"),
        (struct.pack("<Q", 100) + b"{}", "header length"),
        (struct.pack("<Q", 2) + b"\xff\xfe", "not UTF-8 JSON"),
        (struct.pack("<Q", 3) + b"NaN", "not UTF-8 JSON"),
        (blob_of([1, 2]), "JSON list, not an object"),
        (blob_of(7), "JSON int, not an object"),
        (blob_of({"__metadata__": ["x"]}), "__metadata__ must be an object"),
        (blob_of({"__metadata__": {"k": 1}}), r"__metadata__\['k'\] must be a string"),
        (blob_of({"t": _entry(shape=[2**64])}, b"\0" * 8), "exceeds"),
        (blob_of({"t": _entry(shape=[-1])}, b"\0" * 8), "non-negative integers"),
        (blob_of({"t": _entry(shape=[True])}, b"\0" * 8), "non-negative integers"),
        (blob_of({"t": _entry(shape=[2**31, 2**31, 2**31])}, b"\0" * 8), "exceeds"),
        (blob_of({"t": _entry(shape=[3])}, b"\0" * 8), "do not fit shape"),
        (blob_of({"t": _entry(dtype="Q8")}, b"\0" * 8), "unsupported dtype"),
        (blob_of({"t": _entry(offsets=[0, 2**70])}, b"\0" * 8), "do not fit"),
        (blob_of({"t": _entry(offsets=[8, 16])}, b"\0" * 8), "hole"),
        (blob_of({"t": _entry(offsets=[0, 8])}, b"\0" * 4), "cover 8 bytes"),
        (
            blob_of({"t": _entry(), "u": _entry(offsets=[4, 12])}, b"\0" * 12),
            "overlaps",
        ),
        (blob_of({"t": "F32"}), "header entry is an object"),
        (blob_of({"t": _entry() | {"extra": 1}}, b"\0" * 8), "header entry is an object"),
        (blob_of({"t": _entry(offsets=[0])}, b"\0" * 8), "data_offsets must be two"),
    ],
)
def test_malformed_headers_raise_the_format_error(blob: bytes, match: str) -> None:
    with pytest.raises(ExecutionError, match=match):
        parse_safetensors(blob)


def test_tensor_size_bound_is_below_int64() -> None:
    assert MAX_TENSOR_BYTES < 2**63


@FUZZ
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_the_format_error(data: bytes) -> None:
    for blob in (data, struct.pack("<Q", len(data)) + data):
        try:
            parse_safetensors(blob)
        except ExecutionError as exc:
            assert str(exc)


JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _mutate(data: st.DataObject, doc: Any) -> Any:
    """Replace or delete one node of a JSON document, chosen at random."""
    doc = copy.deepcopy(doc)
    parent: Any = None
    key: Any = None
    node = doc
    while isinstance(node, (dict, list)) and node and data.draw(st.booleans()):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, data.draw(st.sampled_from(keys))
        node = node[key]
    if parent is None:
        return data.draw(JSON)
    if isinstance(parent, dict) and data.draw(st.booleans()):
        del parent[key]
    else:
        parent[key] = data.draw(JSON)
    return doc


@FUZZ
@given(st.data())
def test_mutated_headers_only_raise_the_format_error(data: st.DataObject) -> None:
    blob = valid_blob()
    (length,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + length])
    mutated = blob_of(_mutate(data, header), blob[8 + length :])
    try:
        view = parse_safetensors(mutated)
    except ExecutionError as exc:
        assert str(exc)
    else:
        for tensor in view.tensors.values():
            assert tensor.nbytes <= len(mutated)


@FUZZ
@given(st.data())
def test_flipped_bytes_only_raise_the_format_error(data: st.DataObject) -> None:
    blob = bytearray(valid_blob())
    for _ in range(data.draw(st.integers(1, 4))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    try:
        parse_safetensors(bytes(blob))
    except ExecutionError as exc:
        assert str(exc)


def test_encoded_headers_are_reproducible_and_parse() -> None:
    prefix, placed = encode_header([], {MANIFEST_KEY: "x"})
    assert encode_header([], {MANIFEST_KEY: "x"})[0] == prefix and placed == []
    assert parse_header(prefix, len(prefix)).metadata == {MANIFEST_KEY: "x"}


# --- manifest ----------------------------------------------------------------------------------


@pytest.mark.parametrize("virtual", [False, True])
def test_manifest_round_trip(virtual: bool) -> None:
    manifest = valid_manifest(virtual)
    text = manifest.to_json()
    again = Manifest.from_json(text)
    assert again == manifest and again.to_json() == text
    assert json.loads(text)["format"] == FORMAT


def _doc(**changes: Any) -> dict[str, Any]:
    doc = valid_manifest().to_dict()
    for path, value in changes.items():
        node = doc
        *parents, last = path.split("__")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is KeyError:
            del node[last]
        else:
            node[last] = value
    return doc


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (7, "manifest must be an object, got int"),
        ([1], "manifest must be an object, got list"),
        ("x", "manifest must be an object, got str"),
        (_doc(format="lockstep.shard/2"), "unknown version"),
        (_doc(format=KeyError), "unknown version"),
        (_doc(stage=KeyError), "lacks manifest.stage"),
        (_doc(stage="0"), "manifest.stage must be an integer, got str"),
        (_doc(stage=True), "manifest.stage must be an integer, got bool"),
        (_doc(stage=5), r"manifest.stage is 5, not in 0\.\.0"),
        (_doc(declared_bytes=2**64), "declared_bytes is 18446744073709551616"),
        (_doc(declared_bytes=10**400), "bits"),
        (_doc(weight_bytes=-1), "weight_bytes is -1"),
        (_doc(virtual="no"), "virtual must be a boolean"),
        (_doc(tp__size=0), "tp.size is 0"),
        (_doc(tp__rank=1), r"tp.rank is 1, not in 0\.\.0"),
        (_doc(serving__max_batch=0), "serving.max_batch is 0"),
        (_doc(model__config__hidden_size=0), "model.config.hidden_size is 0"),
        (_doc(model__config__rope_theta=-1.0), "rope_theta must be a positive"),
        (_doc(model__config__bogus=1), "unknown keys"),
        (_doc(model__config__vocab_size=KeyError), "lacks model.config.vocab_size"),
        (_doc(ops=3), "ops must be a list"),
        (_doc(ops__0__chunks=0), r"ops\[0\].chunks is 0"),
        (_doc(ops__0__units=[5, 1]), r"ops\[0\].units\[1\]"),
        (_doc(ops__0__ranks=[]), "one \\[start, end\\] per TP rank"),
        (_doc(ops__0__rank_units=[0, 1]), "rank_units is not ranks"),
        (  # attention cut in KV heads, as shards compiled before query-head cuts were
            _doc(
                ops__1__width=4,
                ops__1__units=[0, 4],
                ops__1__ranks=[[0, 4]],
                ops__1__rank_units=[0, 4],
            ),
            r"ops\[1\].width is 4, but attention ops of this model are cut in 8 units",
        ),
        (_doc(tensors=[]), "tensors must be an object"),
        (_doc(**{"tensors__model.norm.weight__dtype": "Q8"}), "dtype 'Q8' is unknown"),
        (_doc(**{"tensors__model.norm.weight__shape": [2**64]}), r"shape\[0\]"),
        (_doc(**{"tensors__model.norm.weight__sha256": None}), "sha256 must be 64"),
        (_doc(extra=1), "unknown keys"),
        (_doc(tp__group=["c0"]), "tp has unknown keys"),
        (_doc(serving=None), "serving must be an object, got null"),
    ],
)
def test_malformed_manifests_name_the_field(doc: Any, match: str) -> None:
    with pytest.raises(ExecutionError, match=match):
        Manifest.from_json(json.dumps(doc))


@pytest.mark.parametrize("text", ["", "{", "NaN", '{"a": Infinity}', "[" * 100_000, b"\xff"])
def test_manifest_that_is_not_json(text: str | bytes) -> None:
    with pytest.raises(ExecutionError, match="not JSON"):
        Manifest.from_json(text)


@FUZZ
@given(st.data())
def test_mutated_manifests_only_raise_the_format_error(data: st.DataObject) -> None:
    mutated = _mutate(data, valid_manifest().to_dict())
    try:
        manifest = Manifest.from_json(json.dumps(mutated))
    except ExecutionError as exc:
        assert str(exc)
    else:
        assert Manifest.from_json(manifest.to_json()) == manifest


def test_check_entries_compares_the_blob_with_the_manifest() -> None:
    manifest = valid_manifest()
    blob = encode_safetensors(
        {"model.norm.weight": np.ones(TINY.hidden_size, np.float16)},
        {MANIFEST_KEY: manifest.to_json()},
    )
    manifest.check_entries(parse_safetensors(blob).entries)
    other = encode_safetensors({"model.norm.weight": np.ones(3, np.float16)})
    with pytest.raises(ExecutionError, match="the manifest F16"):
        manifest.check_entries(parse_safetensors(other).entries)
    with pytest.raises(ExecutionError, match="not listed"):
        manifest.check_entries(parse_safetensors(valid_blob()).entries)
    with pytest.raises(ExecutionError, match="virtual"):
        dataclasses.replace(valid_manifest(True)).check_entries(parse_safetensors(blob).entries)


# --- content address ---------------------------------------------------------------------------


def test_shard_id_is_the_blake3_of_the_blob(tmp_path: Any) -> None:
    blob = valid_blob()
    path = tmp_path / "b.safetensors"
    path.write_bytes(blob)
    assert shard_id_of(blob) == file_shard_id(path) and len(shard_id_of(blob)) == 64
    # The BLAKE3 test vector of the empty input.
    assert shard_id_of(b"") == "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
