"""Hardened YAML for files people hand to Lockstep: deployments and topologies.

Layers, each a reason for a class of error:

1. Bytes. A file is capped at 1 MiB, must be UTF-8 and must not contain NUL or other control
   characters: these are small hand-written texts, and refusing binary input early keeps
   garbage away from the YAML parser and gives a clear message instead of a parser stack.
2. YAML. The text is *composed* (not constructed) with a SafeLoader-based composer so every node
   keeps its line. Everything such a file never needs and an attacker might use is refused:
   anchors and aliases (billion-laughs bombs), explicit tags other than the plain core ones
   (`!!binary`, `!!python/...`, custom tags), several documents in one file, nesting deeper than
   32 levels, duplicate keys (YAML says they are an error; PyYAML silently keeps the last one),
   non-string keys, integers beyond ±2**53 (they do not survive JSON, which is what Kubernetes
   stores) and non-finite floats.

`SpecError` is the one error type for a file that cannot be accepted: it names the file, line
and dotted field path, and can carry many problems at once.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import yaml
from yaml.composer import Composer
from yaml.events import AliasEvent, NodeEvent, ScalarEvent, StreamEndEvent
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from placement.errors import field_path as format_path

MAX_FILE_BYTES = 1 << 20
"""A deployment or topology is a page of text; anything bigger is a mistake or an attack."""
MAX_DEPTH = 32
"""Deepest nesting of mappings/lists accepted; a valid deployment needs 4."""
MAX_SAFE_INTEGER = 2**53
"""Largest integer magnitude that survives a round trip through JSON (and so Kubernetes)."""
MAX_SHOWN_ERRORS = 50
"""`str(SpecError)` lists at most this many problems; `SpecError.errors` always has all."""

_EXPECTED = {  # what a file should hold, and its top-level fields
    "deployment file": ("an LPUDeployment manifest", "apiVersion, kind, metadata, spec"),
    "topology file": ("a Topology", "profile, racks, chips"),
}

# --- errors ---------------------------------------------------------------------------------


class SpecError(Exception):
    """A deployment or topology file (or manifest) that cannot be accepted.

    `file` names the source, `line` is 1-based (None when unknown, e.g. for a manifest that came
    as a dict), `field` is the dotted path (`spec.serving.maxBatch`, `spec.placement.racks[1]`,
    empty for whole-file problems) and `message` says what is wrong and, where possible, how to
    fix it. `column` is set for YAML syntax errors.

    Validation reports every problem at once: `errors` lists them all (sorted by line), each a
    single-problem `SpecError`; for a single problem it is `[self]`. The attributes of an
    aggregate are those of its first error, so `exc.field` / `exc.line` work either way, and
    `str()` shows one problem per line.
    """

    message: str
    file: str
    line: int | None
    field: str
    column: int | None
    errors: list[SpecError]

    def __init__(
        self,
        message: str = "",
        *,
        file: str = "",
        line: int | None = None,
        field: str = "",
        column: int | None = None,
        errors: Iterable[SpecError] | None = None,
    ) -> None:
        if errors is not None:
            flat = sorted(_flatten(errors), key=_error_sort_key)
            if not flat:
                raise ValueError("SpecError(errors=...) needs at least one error")
            first = flat[0]
            message, file, line = first.message, first.file, first.line
            field, column = first.field, first.column
            self.errors = flat
        else:
            self.errors = [self]
        self.message = message
        self.file = file
        self.line = line
        self.field = field
        self.column = column
        super().__init__(str(self))

    @classmethod
    def combine(cls, errors: Sequence[SpecError]) -> SpecError:
        """One error if there is one, else an aggregate of all of them."""
        if len(errors) == 1:
            return errors[0]
        return cls(errors=errors)

    def _one_line(self) -> str:
        where = self.file
        if self.line is not None:
            where = f"{where}:{self.line}" if where else f"line {self.line}"
        parts = [p for p in (where, self.field) if p]
        return ": ".join([*parts, self.message])

    def __str__(self) -> str:
        if len(self.errors) <= 1:
            return self._one_line()
        shown = [e._one_line() for e in self.errors[:MAX_SHOWN_ERRORS]]
        rest = len(self.errors) - len(shown)
        if rest:
            shown.append(f"... and {rest} more problems")
        return "\n".join(shown)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep the attributes when the error crosses a process boundary (Ray, multiprocessing).
        others = [e for e in self.errors if e is not self]
        return (
            _restore_spec_error,
            (self.message, self.file, self.line, self.field, self.column, others),
        )


def _restore_spec_error(
    message: str,
    file: str,
    line: int | None,
    field: str,
    column: int | None,
    others: list[SpecError],
) -> SpecError:
    if others:
        return SpecError(errors=others)
    return SpecError(message, file=file, line=line, field=field, column=column)


def _flatten(errors: Iterable[SpecError]) -> Iterator[SpecError]:
    for err in errors:
        if len(err.errors) > 1:
            yield from err.errors
        else:
            yield err


def _error_sort_key(err: SpecError) -> tuple[bool, int, str]:
    return (err.line is None, err.line or 0, err.field)


# --- bytes and YAML -------------------------------------------------------------------------

_NON_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_YAML_TAG = "tag:yaml.org,2002:"
_STR, _INT, _FLOAT, _BOOL, _NULL, _SEQ, _MAP = (
    _YAML_TAG + t for t in ("str", "int", "float", "bool", "null", "seq", "map")
)
_ALLOWED_EXPLICIT_TAGS = frozenset({_STR, _INT, _FLOAT, _BOOL, _NULL, _SEQ, _MAP})
# Implicitly resolved scalars that a JSON-shaped document keeps as text.
_TEXT_TAGS = frozenset({_STR, _YAML_TAG + "timestamp", _YAML_TAG + "merge", _YAML_TAG + "value"})
_CONSTRUCTOR = yaml.constructor.SafeConstructor()


def _too_big_message(size: int, what: str = "deployment file") -> str:
    return (
        f"file is too large ({size} bytes); a {what} may be at most {MAX_FILE_BYTES} bytes (1 MiB)"
    )


def _line_of(data: bytes | str, index: int) -> int:
    newline: Any = b"\n" if isinstance(data, bytes) else "\n"
    return data.count(newline, 0, index) + 1


def as_bytes(text: str | bytes, source: str) -> bytes:
    if isinstance(text, bytes | bytearray | memoryview):
        return bytes(text)
    if not isinstance(text, str):
        raise SpecError(f"expected text or bytes, got {type(text).__name__}", file=source)
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(_too_big_message(len(text)), file=source)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SpecError(
            "text contains invalid Unicode (a lone surrogate)",
            file=source,
            line=_line_of(text, exc.start),
        ) from None


class _Refusal(Exception):
    """Raised from inside the composer for input that is valid YAML but not accepted here."""

    def __init__(self, message: str, mark: Any) -> None:
        super().__init__(message)
        self.message = message
        self.mark = mark


def _short_tag(tag: str) -> str:
    return "!!" + tag[len(_YAML_TAG) :] if tag.startswith(_YAML_TAG) else tag


class _StrictComposer(Composer):
    """A composer that refuses aliases, anchors, unusual tags, deep nesting and extra documents.

    Mixed in front of a PyYAML parser (libyaml's C parser when available, else the pure
    Python one), so the checks happen while events stream in, before any node graph (and so
    any alias expansion) exists.
    """

    _depth: int

    if TYPE_CHECKING:  # provided by the parser half of the loader (C or Python)

        def get_event(self) -> Any: ...
        def peek_event(self) -> Any: ...
        def check_event(self, *choices: Any) -> bool: ...

    def get_single_node(self) -> Node | None:
        self.get_event()  # StreamStart
        document = None
        if not self.check_event(StreamEndEvent):
            document = self.compose_document()
        if not self.check_event(StreamEndEvent):
            event = self.get_event()
            raise _Refusal(
                "the file holds more than one YAML document ('---'); put one document "
                "(one LPUDeployment or Topology) in each file",
                event.start_mark,
            )
        self.get_event()  # StreamEnd
        return document

    def compose_node(self, parent: Node | None, index: Any) -> Node:
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise _Refusal(
                f"YAML aliases/anchors are not allowed (found alias '*{event.anchor}'); "
                "write the value out",
                event.start_mark,
            )
        if isinstance(event, NodeEvent) and event.anchor is not None:
            raise _Refusal(
                f"YAML aliases/anchors are not allowed (found anchor '&{event.anchor}'); "
                "write the value out",
                event.start_mark,
            )
        tag = getattr(event, "tag", None)
        if tag is not None and tag != "!" and tag not in _ALLOWED_EXPLICIT_TAGS:
            raise _Refusal(
                f"YAML tag '{_short_tag(tag)}' is not allowed; write plain values (strings, "
                "numbers, true/false, null, lists and mappings)",
                event.start_mark,
            )
        if isinstance(event, ScalarEvent):
            return cast(Node, super().compose_node(parent, index))
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refusal(
                    f"nesting is too deep (more than {MAX_DEPTH} levels of mappings/lists)",
                    event.start_mark,
                )
            return cast(Node, super().compose_node(parent, index))
        finally:
            self._depth -= 1


class _PyLoader(_StrictComposer, yaml.SafeLoader):
    def __init__(self, stream: str) -> None:
        yaml.SafeLoader.__init__(self, stream)
        self._depth = 0


_Loader: type[Any] = _PyLoader
if getattr(yaml, "__with_libyaml__", False):

    class _CLoader(_StrictComposer, yaml.CSafeLoader):
        def __init__(self, stream: str) -> None:
            yaml.CSafeLoader.__init__(self, stream)
            self.anchors = {}
            self._depth = 0

    _Loader = _CLoader


def _syntax_error(exc: yaml.YAMLError, text: str, source: str) -> SpecError:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        line = mark.line + 1 if mark is not None else None
        column = mark.column + 1 if mark is not None else None
        message = "YAML syntax error"
        if column is not None:
            message += f" at column {column}"
        message += f": {problem}"
        if exc.context and exc.problem and exc.context_mark is not None:
            context_line = exc.context_mark.line + 1
            if context_line != line:
                message += f" ({exc.context} at line {context_line})"
            else:
                message += f" ({exc.context})"
        if line is not None:
            lines = text.splitlines()
            if 0 < line <= len(lines) and "\t" in lines[line - 1]:
                message += "; YAML does not allow tabs for indentation, use spaces"
        return SpecError(message, file=source, line=line, column=column)
    if isinstance(exc, yaml.reader.ReaderError):
        return SpecError(
            f"character {exc.character!r} is not allowed in YAML",
            file=source,
            line=_line_of(text, exc.position),
        )
    return SpecError("invalid YAML", file=source)


def load_yaml_bytes(
    data: bytes, source: str, what: str = "deployment file"
) -> tuple[dict[str, Any], dict[tuple[Any, ...], int]]:
    """Bytes to a plain JSON-shaped dict plus a map field path -> 1-based line."""
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(_too_big_message(len(data), what), file=source)
    nul = data.find(b"\x00")
    if nul >= 0:
        raise SpecError(
            f"file contains a NUL byte (binary data?); a {what} must be UTF-8 YAML text",
            file=source,
            line=_line_of(data, nul),
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"file is not valid UTF-8 text (invalid byte 0x{data[exc.start]:02x}); save it as "
            "UTF-8",
            file=source,
            line=_line_of(data, exc.start),
        ) from None
    text = text.removeprefix("\ufeff")
    bad = _NON_PRINTABLE.search(text)
    if bad:
        raise SpecError(
            f"control character U+{ord(bad.group()):04X} is not allowed (binary data?); a "
            f"{what} must be YAML text",
            file=source,
            line=_line_of(text, bad.start()),
        )
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except _Refusal as exc:
        line = exc.mark.line + 1 if exc.mark is not None else None
        raise SpecError(exc.message, file=source, line=line) from None
    except yaml.YAMLError as exc:
        raise _syntax_error(exc, text, source) from None
    finally:
        loader.dispose()
    if node is None:
        raise SpecError(
            "file is empty; expected {} ({})".format(*_EXPECTED.get(what, ("a mapping", "..."))),
            file=source,
            line=1,
        )
    if not isinstance(node, MappingNode):
        raise SpecError(
            "the top level must be a mapping ({}), got {}".format(
                _EXPECTED.get(what, ("", "..."))[1], _node_kind(node)
            ),
            file=source,
            line=node.start_mark.line + 1,
        )
    converter = _Converter(source)
    doc = converter.convert(node, ())
    if converter.errors:
        raise SpecError.combine(converter.errors)
    return doc, converter.lines


def _node_kind(node: Node) -> str:
    if isinstance(node, SequenceNode):
        return "a list"
    if isinstance(node, MappingNode):
        return "a mapping"
    return f"a scalar ({node.value[:40]!r})" if isinstance(node.value, str) else "a scalar"


class _Converter:
    """Composed YAML nodes to plain data, recording each field's line and refusing the unsafe."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines: dict[tuple[Any, ...], int] = {}
        self.errors: list[SpecError] = []

    def _error(self, message: str, path: tuple[Any, ...], node: Node) -> None:
        self.errors.append(
            SpecError(
                message,
                file=self.source,
                line=node.start_mark.line + 1,
                field=format_path(path),
            )
        )

    def convert(self, node: Node, path: tuple[Any, ...]) -> Any:
        self.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, MappingNode):
            if node.tag != _MAP:
                self._error(f"tag '{_short_tag(node.tag)}' cannot apply to a mapping", path, node)
                return {}
            return self._mapping(node, path)
        if isinstance(node, SequenceNode):
            if node.tag != _SEQ:
                self._error(f"tag '{_short_tag(node.tag)}' cannot apply to a list", path, node)
                return []
            out = []
            for index, item in enumerate(node.value):
                item_path = (*path, index)
                self.lines[item_path] = item.start_mark.line + 1
                out.append(self.convert(item, item_path))
            return out
        return self._scalar(cast(ScalarNode, node), path)

    def _mapping(self, node: MappingNode, path: tuple[Any, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, ScalarNode):
                self._error(
                    "mapping keys must be plain strings, not lists or mappings", path, key_node
                )
                continue
            key = self._scalar(key_node, path)
            if not isinstance(key, str):
                raw = key_node.value[:60]
                self._error(
                    f"mapping key {raw} is read as {show_value(key)}, not as a string; quote it "
                    f'("{raw}")',
                    path,
                    key_node,
                )
                continue
            key_path = (*path, key)
            key_line = key_node.start_mark.line + 1
            if key in out:
                first = self.lines.get(key_path)
                where = f" (first defined at line {first})" if first is not None else ""
                self._error(f"duplicate key {clip(key)!r}{where}", key_path, key_node)
                continue
            self.lines[key_path] = key_line
            out[key] = self.convert(value_node, key_path)
        return out

    def _scalar(self, node: ScalarNode, path: tuple[Any, ...]) -> Any:
        tag = node.tag
        try:
            if tag in _TEXT_TAGS:
                value: Any = node.value
            elif tag == _NULL:
                return None
            elif tag == _BOOL:
                return _CONSTRUCTOR.construct_yaml_bool(node)
            elif tag == _INT:
                value = _CONSTRUCTOR.construct_yaml_int(node)
            elif tag == _FLOAT:
                value = _CONSTRUCTOR.construct_yaml_float(node)
            else:
                self._error(f"tag '{_short_tag(tag)}' cannot apply to a scalar", path, node)
                return None
        except (ValueError, KeyError, IndexError):
            value_text = node.value
            if tag == _INT and value_text.strip("+-_") and not value_text.strip("+-_0123456789"):
                self._error(
                    f"integer {clip(node.value, 24)} is out of range (at most ±2**53)",
                    path,
                    node,
                )
            else:
                self._error(
                    f"{clip(node.value)!r} is not a valid {_short_tag(tag)} value", path, node
                )
            return None
        if isinstance(value, str):
            if "\x00" in value:
                self._error("NUL characters are not allowed in strings", path, node)
            return value
        if isinstance(value, int) and abs(value) > MAX_SAFE_INTEGER:
            self._error(
                f"integer {clip(node.value, 24)} is out of range (at most ±2**53, the "
                "largest exact integer in JSON)",
                path,
                node,
            )
            return None
        if isinstance(value, float) and not math.isfinite(value):
            self._error(f"non-finite number {clip(node.value, 24)} is not allowed", path, node)
            return None
        return value


def plain_data(
    value: Any, path: tuple[Any, ...], source: str, errors: list[SpecError], depth: int
) -> Any:
    """Deep-copy a manifest given as data, refusing what a YAML file could not contain."""

    def fail(message: str) -> None:
        errors.append(SpecError(message, file=source, field=format_path(path)))

    if isinstance(value, Mapping | list | tuple) and depth > MAX_DEPTH:
        fail(f"nesting is too deep (more than {MAX_DEPTH} levels of mappings/lists)")
        return None
    if isinstance(value, Mapping):
        out = {}
        for key, sub in value.items():
            if not isinstance(key, str):
                fail(f"mapping key {show_value(key)} is not a string")
                continue
            out[key] = plain_data(sub, (*path, key), source, errors, depth + 1)
        return out
    if isinstance(value, list | tuple):
        return [
            plain_data(sub, (*path, i), source, errors, depth + 1) for i, sub in enumerate(value)
        ]
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_SAFE_INTEGER:
            fail("integer is out of range (at most ±2**53)")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            fail(f"non-finite number {value} is not allowed")
        return value
    fail(f"unsupported value of type {type(value).__name__}")
    return None


# --- paths and wording ----------------------------------------------------------------------


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def show_value(value: Any) -> str:
    """A value as the user wrote it in YAML, for messages."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return repr(clip(value))
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return type(value).__name__


# --- files ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class YamlDocument:
    """A parsed file: plain JSON-shaped data, and the line of every field path."""

    data: dict[str, Any]
    lines: dict[tuple[Any, ...], int]
    source: str

    def dotted_lines(self) -> dict[str, int]:
        """Lines keyed by `format_path` strings (`racks[0].name`), for the pure cores."""
        return {format_path(path): line for path, line in self.lines.items()}


def read_capped_file(path: str | os.PathLike[str], what: str = "deployment file") -> bytes:
    """The bytes of a regular file of at most `MAX_FILE_BYTES`, or a `SpecError` saying why not."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            st = os.fstat(fh.fileno())
            if stat.S_ISDIR(st.st_mode):
                raise SpecError(f"is a directory, not a {what}", file=source)
            if not stat.S_ISREG(st.st_mode):
                # FIFOs and devices could block or never end; these are plain files.
                raise SpecError("is not a regular file", file=source)
            if st.st_size > MAX_FILE_BYTES:
                raise SpecError(_too_big_message(st.st_size, what), file=source)
            return fh.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise SpecError("file not found", file=source) from None
    except IsADirectoryError:
        raise SpecError(f"is a directory, not a {what}", file=source) from None
    except PermissionError:
        raise SpecError("permission denied", file=source) from None
    except OSError as exc:
        raise SpecError(f"cannot read file: {exc.strerror or exc}", file=source) from None


def load_yaml_file(path: str | os.PathLike[str], what: str = "topology file") -> YamlDocument:
    source = os.fspath(path)
    data, lines = load_yaml_bytes(read_capped_file(source, what), source, what)
    return YamlDocument(data, lines, source)
