"""Model weights in the Hugging Face layout: generate them from a seed, read them lazily.

A generated checkpoint is what `save_pretrained` would write for a Llama/Mistral/Mixtral model:
`config.json` plus `model.safetensors`, or `model-0000i-of-0000n.safetensors` files and a
`model.safetensors.index.json` when the weights exceed `max_file_bytes`. Tensor names and
`[out, in]` shapes come from `shardformat.layout.checkpoint_tensor_shapes`, the one place the
executor and the compiler also take them from.

Reproducibility: every tensor is drawn from its own `Generator(PCG64(SeedSequence([seed,
<sha256 of its name>])))` with `standard_normal(dtype=float32)` — numpy's documented
stream-compatible path — scaled by a float32 factor and rounded to fp16/bf16 with
round-to-nearest-even. No step depends on the machine, the thread count or the order tensors
are produced in, so the same seed gives the same bytes anywhere (pinned numpy) and any single
tensor can be produced on its own (`SeededWeights` serves the compiler without a checkpoint).

Scales keep activations well-conditioned: projections into a layer are N(0, 1/fan_in) so they
preserve magnitude, projections back into the residual stream are scaled down by
sqrt(2 x layers), embeddings are N(0, 1) and norm weights 1 + N(0, 0.05²).

Reading (`open_checkpoint`) uses `safetensors.safe_open(framework="numpy")`, which maps the files
and copies only the tensors or slices asked for. numpy has no bfloat16, so BF16 tensors are read
from the same mapped file by offset and widened to float32. Every name and shape is checked
against the `ModelConfig` up front; errors name the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from safetensors import SafetensorError, safe_open

from orchestrator.shard_store import atomic_file, read_safetensors_header, write_safetensors
from placement.errors import InputError
from placement.models import ModelConfig, model_from_hf_config, to_hf_config
from shardformat.codec import STORAGE_DTYPES, TensorEntry, decode_f32
from shardformat.errors import ExecutionError
from shardformat.layout import TensorSlice, checkpoint_tensor_shapes
from shardformat.text import MAX_TOKENIZER_BYTES, TextSpec, eos_token_ids

PRECISION_DTYPES = {"fp32": "F32", "fp16": "F16", "bf16": "BF16"}
"""Checkpoint storage dtype of each precision that has one (int8/fp8 need quantization)."""
GENERATOR_VERSION = 1
DEFAULT_MAX_FILE_BYTES = 2 << 30
SEEDED_CACHE_BYTES = 256 << 20
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_CONFIG_FILE = "generation_config.json"
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class WeightSource(Protocol):
    """What the compiler reads weights from: stored-form slices of Hugging Face tensors."""

    def dtype_of(self, name: str) -> str: ...

    def raw_slice(self, ts: TensorSlice) -> np.ndarray: ...

    def fingerprint(self) -> dict[str, Any]: ...


def precision_dtype(precision: str) -> str:
    """The safetensors dtype weights of `precision` are stored in."""
    if precision not in PRECISION_DTYPES:
        raise InputError(
            f"precision {precision!r} has no unquantized storage dtype; checkpoints are written "
            f"in {', '.join(PRECISION_DTYPES)} (int8/fp8 shards are quantized from them on "
            "compile)",
            field="precision",
        )
    return PRECISION_DTYPES[precision]


# --- generation ------------------------------------------------------------------------------


def _name_words(name: str) -> list[int]:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def _init_std(cfg: ModelConfig, name: str, shape: tuple[int, ...]) -> float:
    if name.endswith("norm.weight"):
        return 0.05
    if name == "model.embed_tokens.weight":
        return 1.0
    if name.endswith(".bias"):
        return 0.02
    fan_in = shape[1]
    if name.endswith(("o_proj.weight", "down_proj.weight", "w2.weight")):
        return 1.0 / float(np.sqrt(fan_in * 2 * cfg.num_hidden_layers))
    return 1.0 / float(np.sqrt(fan_in))


def to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bits (uint16), rounding to nearest even (values are finite)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    return ((bits + rounding) >> np.uint32(16)).astype(np.uint16)


def seeded_tensor(cfg: ModelConfig, seed: int, name: str, dtype: str) -> np.ndarray:
    """One tensor of the seeded model, in stored form (uint16 bits for BF16)."""
    shape = checkpoint_tensor_shapes(cfg)[name]
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *_name_words(name)])))
    values = rng.standard_normal(shape, dtype=np.float32) * np.float32(_init_std(cfg, name, shape))
    if name.endswith("norm.weight"):
        values += np.float32(1.0)
    if dtype == "F32":
        return values
    if dtype == "F16":
        return values.astype(np.float16)
    if dtype == "BF16":
        return to_bf16_bits(values)
    raise InputError(f"cannot generate weights stored as {dtype}", field="dtype")


class SeededWeights(Mapping[str, np.ndarray]):
    """The seeded model's tensors, produced on demand (nothing is generated up front).

    As a mapping it yields compute-ready arrays (BF16 widened to float32) for the reference
    executor; `raw_slice` yields stored-form slices for the compiler.
    """

    def __init__(self, cfg: ModelConfig, seed: int, dtype: str = "F16") -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise InputError(f"a weight seed is a non-negative integer, got {seed!r}", field="seed")
        if dtype not in _TORCH_DTYPES:
            raise InputError(
                f"dtype must be one of {', '.join(_TORCH_DTYPES)}, got {dtype!r}", field="dtype"
            )
        self.cfg, self.seed, self.dtype = cfg, seed, dtype
        self.shapes = checkpoint_tensor_shapes(cfg)
        # The compiler cuts each tensor for several ranks and chunks in a row: keep the most
        # recent tensors, bounded in bytes so a large model is never held whole.
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    def raw(self, name: str) -> np.ndarray:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        array = seeded_tensor(self.cfg, self.seed, name, self.dtype)
        self._cache[name] = array
        while (
            sum(a.nbytes for a in self._cache.values()) > SEEDED_CACHE_BYTES
            and len(self._cache) > 1
        ):
            self._cache.popitem(last=False)
        return array

    def dtype_of(self, name: str) -> str:
        return self.dtype

    def raw_slice(self, ts: TensorSlice) -> np.ndarray:
        return np.ascontiguousarray(ts.take(self.raw(ts.source)))

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "seed",
            "seed": self.seed,
            "dtype": self.dtype,
            "generator": GENERATOR_VERSION,
            "config": self.cfg.to_dict(),
        }

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        raw = self.raw(name)
        return decode_f32(raw, "BF16") if self.dtype == "BF16" else raw

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The `config.json` of `cfg` as transformers 5.x writes it (`placement.models.to_hf_config`:
    the architecture its flags imply, `rope_parameters`), with the weights' dtype under both
    the 5.x key `dtype` and the 4.x key `torch_dtype`."""
    try:
        out = to_hf_config(cfg)
    except ValueError as exc:
        raise InputError(str(exc), field="model") from None
    return out | {"dtype": _TORCH_DTYPES[dtype], "torch_dtype": _TORCH_DTYPES[dtype]}


@dataclass(frozen=True)
class CheckpointFiles:
    directory: Path
    files: tuple[Path, ...]  # weight files, then the index if any, then config.json


def write_checkpoint(
    cfg: ModelConfig,
    out_dir: str | Path,
    seed: int,
    precision: str = "fp16",
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> CheckpointFiles:
    """Write the seeded model as a Hugging Face checkpoint, one tensor in memory at a time."""
    dtype = precision_dtype(precision)
    weights = SeededWeights(cfg, seed, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    groups = _pack(cfg, dtype, max_file_bytes)
    names = (
        [SINGLE_FILE]
        if len(groups) == 1
        else [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    )
    written = []
    for file_name, entries in zip(names, groups, strict=True):
        write_safetensors(out / file_name, entries, {"format": "pt"}, lambda e: weights.raw(e.name))
        written.append(out / file_name)
    if len(groups) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for g in groups for e in g)},
            "weight_map": {e.name: f for f, g in zip(names, groups, strict=True) for e in g},
        }
        written.append(_write_json(out / INDEX_FILE, index))
    written.append(_write_json(out / CONFIG_FILE, hf_config(cfg, dtype)))
    return CheckpointFiles(out, tuple(written))


def _pack(cfg: ModelConfig, dtype: str, max_file_bytes: int) -> list[list[TensorEntry]]:
    """Tensors in checkpoint order, packed greedily into files of at most `max_file_bytes`."""
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for name, shape in checkpoint_tensor_shapes(cfg).items():
        entry = TensorEntry(name, dtype, shape)
        if groups[-1] and size + entry.nbytes > max_file_bytes:
            groups.append([])
            size = 0
        groups[-1].append(entry)
        size += entry.nbytes
    return groups


def _write_json(path: Path, value: Any) -> Path:
    with atomic_file(path) as out:
        out.write((json.dumps(value, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


# --- reading ---------------------------------------------------------------------------------


@dataclass
class _WeightFile:
    path: Path
    handle: Any  # safetensors safe_open handle
    entries: dict[str, TensorEntry]
    data_start: int
    stat: os.stat_result


class Checkpoint(Mapping[str, np.ndarray]):
    """A Hugging Face checkpoint directory, validated against a `ModelConfig`, read lazily.

    As a mapping it yields compute-ready arrays (F16/F32 as stored, BF16 widened to float32);
    `raw_slice` copies just a slice in stored form. Use as a context manager or call `close`.
    """

    def __init__(self, directory: str | os.PathLike[str], cfg: ModelConfig | None = None) -> None:
        self.directory = Path(directory)
        self.cfg = cfg if cfg is not None else _config_from_dir(self.directory)
        if cfg is not None:
            _check_config_file(self.directory, cfg)
        self.shapes = checkpoint_tensor_shapes(self.cfg)
        self._files: dict[str, _WeightFile] = {}
        self._where: dict[str, _WeightFile] = {}
        try:
            self._open_files()
            self._validate()
        except BaseException:
            self.close()
            raise

    def _open_files(self) -> None:
        for file_name, names in _weight_map(self.directory).items():
            path = self.directory / file_name
            wf = self._open(path)
            for name in names:
                if name not in wf.entries:
                    raise InputError(
                        "the index maps this tensor to a file that lacks it",
                        source=str(path),
                        field=name,
                    )
                self._where[name] = wf
            if not names:  # single-file checkpoint: the file's own tensors
                self._where |= {name: wf for name in wf.entries}

    def _open(self, path: Path) -> _WeightFile:
        if not path.is_file():
            raise InputError("weight file is missing", source=str(path))
        try:
            handle = safe_open(str(path), framework="numpy")
            metadata, entries, data_start = read_safetensors_header(path)
        except (SafetensorError, ExecutionError, OSError) as exc:
            raise InputError(f"not a readable safetensors file: {exc}", source=str(path)) from None
        del metadata
        wf = _WeightFile(path, handle, entries, data_start, path.stat())
        self._files[path.name] = wf
        return wf

    def _validate(self) -> None:
        for name, shape in self.shapes.items():
            wf = self._where.get(name)
            if wf is None:
                source = self.directory / (INDEX_FILE if len(self._files) > 1 else SINGLE_FILE)
                raise InputError(
                    f"tensor is missing; the model config needs it with shape {list(shape)}",
                    source=str(source),
                    field=name,
                )
            entry = wf.entries[name]
            if entry.shape != shape:
                raise InputError(
                    f"shape {list(entry.shape)} does not match the model config, "
                    f"which needs {list(shape)}",
                    source=str(wf.path),
                    field=name,
                )
            if entry.dtype not in _TORCH_DTYPES:
                raise InputError(
                    f"dtype {entry.dtype} is not supported (F32, F16 or BF16)",
                    source=str(wf.path),
                    field=name,
                )
        for name, wf in self._where.items():
            if name in self.shapes or name.endswith(_IGNORED_SUFFIXES):
                continue
            if name == "lm_head.weight" and self.cfg.tie_word_embeddings:
                continue
            raise InputError(
                "unexpected tensor: the model config has no such weight "
                f"({self.cfg.num_hidden_layers} layers, "
                f"{self.cfg.num_local_experts or 'no'} experts)",
                source=str(wf.path),
                field=name,
            )

    def close(self) -> None:
        self._files.clear()
        self._where.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def dtype_of(self, name: str) -> str:
        return self._where[name].entries[name].dtype

    def raw_slice(self, ts: TensorSlice) -> np.ndarray:
        """Slice `ts` of its source tensor in stored form, reading only that slice."""
        wf = self._where[ts.source]
        entry = wf.entries[ts.source]
        if entry.dtype == "BF16":
            return np.ascontiguousarray(ts.take(self._mapped(wf, entry)))
        if ts.axis is None:
            return np.ascontiguousarray(wf.handle.get_tensor(ts.source))
        index = [slice(None)] * len(entry.shape)
        index[ts.axis] = slice(ts.start, ts.end)
        return np.ascontiguousarray(wf.handle.get_slice(ts.source)[tuple(index)])

    def _mapped(self, wf: _WeightFile, entry: TensorEntry) -> np.ndarray:
        return np.memmap(
            wf.path,
            dtype=STORAGE_DTYPES[entry.dtype],
            mode="r",
            offset=wf.data_start + entry.offsets[0],
            shape=entry.shape,
        )

    def fingerprint(self) -> dict[str, Any]:
        """Identity of the files (header digest, size, mtime): what a compile recipe keys on."""
        files = []
        for name, wf in sorted(self._files.items()):
            with open(wf.path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = hashlib.sha256(f.read(length)).hexdigest()
            files.append([name, wf.stat.st_size, wf.stat.st_mtime_ns, header])
        return {"kind": "checkpoint", "config": self.cfg.to_dict(), "files": files}

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.shapes:
            raise KeyError(name)
        wf = self._where[name]
        entry = wf.entries[name]
        if entry.dtype == "BF16":
            return decode_f32(np.array(self._mapped(wf, entry)), "BF16")
        array: np.ndarray = wf.handle.get_tensor(name)
        return array

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def open_checkpoint(
    directory: str | os.PathLike[str], cfg: ModelConfig | None = None
) -> Checkpoint:
    """Open and validate a checkpoint; without `cfg` the model comes from its config.json."""
    return Checkpoint(directory, cfg)


def _weight_map(directory: Path) -> dict[str, list[str]]:
    """Weight file → tensor names (an empty list: a single file holding everything)."""
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            raw = json.loads(index.read_text(encoding="utf-8"))
            weight_map = raw["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise InputError(
                "index is not JSON with a weight_map object", source=str(index)
            ) from None
        files: dict[str, list[str]] = {}
        for name, file_name in weight_map.items():
            if not isinstance(file_name, str) or "/" in file_name or file_name.startswith("."):
                raise InputError(f"bad file name {file_name!r}", source=str(index), field=name)
            files.setdefault(file_name, []).append(name)
        return files
    if (directory / SINGLE_FILE).is_file():
        return {SINGLE_FILE: []}
    raise InputError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in the checkpoint directory", source=str(directory)
    )


def _config_from_dir(directory: Path) -> ModelConfig:
    return model_from_hf_config(directory / CONFIG_FILE, name=directory.name)


def _check_config_file(directory: Path, cfg: ModelConfig) -> None:
    """A config.json beside the weights must describe the same model as `cfg`."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return
    found = model_from_hf_config(path, name=cfg.name)
    for f in fields(cfg):
        if f.name != "name" and getattr(found, f.name) != getattr(cfg, f.name):
            raise InputError(
                f"is {getattr(found, f.name)!r} in the checkpoint but "
                f"{getattr(cfg, f.name)!r} in the model config",
                source=str(path),
                field=f.name,
            )


# --- text ----------------------------------------------------------------------------------


def read_text_spec(directory: str | os.PathLike[str], cfg: ModelConfig) -> TextSpec | None:
    """The checkpoint's tokenizer and EOS ids, or None when it has no `tokenizer.json`.

    EOS ids come from `generation_config.json` (what `generate` stops on in transformers),
    else from `config.json`. The tokenizer must load with the `tokenizers` library and its
    ids fit the model's vocabulary; errors name the file."""
    root = Path(directory)
    path = root / TOKENIZER_FILE
    if not path.is_file():
        return None
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise InputError(f"larger than {MAX_TOKENIZER_BYTES} bytes", source=str(path))
    text = path.read_text(encoding="utf-8")
    try:
        from tokenizers import Tokenizer

        size = Tokenizer.from_str(text).get_vocab_size(with_added_tokens=True)
    except Exception as exc:
        raise InputError(
            f"not a tokenizer the tokenizers library loads: {str(exc)[:200]}", source=str(path)
        ) from None
    if size > cfg.vocab_size:
        raise InputError(
            f"has {size} tokens, the model's vocabulary {cfg.vocab_size}", source=str(path)
        )
    eos: tuple[int, ...] = ()
    for name in (GENERATION_CONFIG_FILE, CONFIG_FILE):
        source = root / name
        if not source.is_file():
            continue
        try:
            raw = json.loads(source.read_text(encoding="utf-8"))
            eos = eos_token_ids(raw.get("eos_token_id") if isinstance(raw, dict) else None, name)
        except (ValueError, ExecutionError) as exc:
            raise InputError(str(exc), source=str(source), field="eos_token_id") from None
        if any(i >= cfg.vocab_size for i in eos):
            raise InputError(
                f"{list(eos)} lies outside the vocabulary (0..{cfg.vocab_size - 1})",
                source=str(source),
                field="eos_token_id",
            )
        if eos:
            break
    return TextSpec(text, eos)


def tiny_text_spec() -> TextSpec:
    """The tiny example model's tokenizer (orchestrator/data/tiny-llama-tokenizer.json, a
    4096-token byte-level BPE; `</s>`, id 2, ends a sequence)."""
    path = Path(__file__).parent / "data" / "tiny-llama-tokenizer.json"
    return TextSpec(path.read_text(encoding="utf-8"), (2,))
