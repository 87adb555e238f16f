"""Text in, text out: the checkpoint's tokenizer.json rides in stage 0's shard to the agent.

Generate with `prompt_text` encodes through it, streams the text each token adds, and stops
on the model's EOS ids (generation_config.json, else config.json). The tiny example model
ships a 4096-token byte-level BPE (orchestrator/data/tiny-llama-tokenizer.json).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from agent_helpers import AgentCluster, AgentProcess, tiny_request

from agents.executor import ReferenceExecutor, load_shard, read_shard
from agents.journal import Journal
from agents.tokenizer import TextCodec
from orchestrator.compiler import compile_plan
from orchestrator.serving import bring_up_replica
from orchestrator.weights import SeededWeights, read_text_spec, tiny_text_spec, write_checkpoint
from placement.errors import InputError
from placement.models import MODEL_PRESETS, ModelConfig
from placement.planner import make_plan
from placement.topology import preset_topology
from protos import agent_pb2
from shardformat.text import GENERATION_KEY, TOKENIZER_KEY, TextSpec

TINY = MODEL_PRESETS["tiny-llama"]
SEED = 5
PROMPT = "Lockstep serves the models people bring — exactly. Grüße ✓"


def test_the_tiny_tokenizer_round_trips_any_text() -> None:
    codec = TextCodec(tiny_text_spec())
    ids = codec.encode(PROMPT)
    assert max(ids) < TINY.vocab_size and codec.decode(ids) == PROMPT
    decoder = codec.stream()
    pieces = [decoder.push(i) for i in ids]
    assert "".join(pieces) == PROMPT and "" in pieces  # ü, ß, ✓ span several byte tokens
    assert codec.stream().push(2) == ""  # </s> adds no text


def test_journal_stops_on_any_eos_id() -> None:
    journal = Journal(slots=1, max_context=16, queue_limit=1, eos_token_id=[7, 9])
    journal.submit("r", (1, 2), 5)
    journal.feed(0)
    assert not journal.on_token(0, 3).finished
    journal.feed(0)
    assert journal.on_token(0, 9).finished


def checkpoint(tmp_path: Path, generation: object = None, config_eos: object = None) -> Path:
    files = write_checkpoint(TINY, tmp_path / "ckpt", SEED)
    (files.directory / "tokenizer.json").write_text(tiny_text_spec().tokenizer_json)
    if config_eos is not None:
        path = files.directory / "config.json"
        path.write_text(json.dumps(json.loads(path.read_text()) | {"eos_token_id": config_eos}))
    if generation is not None:
        (files.directory / "generation_config.json").write_text(json.dumps(generation))
    return files.directory


def test_eos_ids_come_from_generation_config_then_config(tmp_path: Path) -> None:
    directory = checkpoint(tmp_path, {"eos_token_id": [2, 5, 2]}, config_eos=9)
    spec = read_text_spec(directory, TINY)
    assert spec is not None and spec.eos_token_ids == (2, 5)
    (directory / "generation_config.json").unlink()
    spec = read_text_spec(directory, TINY)
    assert spec is not None and spec.eos_token_ids == (9,)
    (directory / "tokenizer.json").unlink()
    assert read_text_spec(directory, TINY) is None


@pytest.mark.parametrize(
    ("generation", "tokenizer", "words"),
    [
        ({"eos_token_id": TINY.vocab_size}, None, "outside the vocabulary"),
        ({"eos_token_id": "x"}, None, "eos_token_id must be"),
        (None, "{not json", "tokenizers library"),
    ],
)
def test_bad_text_files_are_input_errors(
    tmp_path: Path, generation: object, tokenizer: str | None, words: str
) -> None:
    directory = checkpoint(tmp_path, generation)
    if tokenizer is not None:
        (directory / "tokenizer.json").write_text(tokenizer)
    with pytest.raises(InputError, match=words):
        read_text_spec(directory, TINY)


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path: Path) -> None:
    small = ModelConfig("small", 512, 64, 96, 1, 4, 2)
    files = write_checkpoint(small, tmp_path / "small", 1)
    (files.directory / "tokenizer.json").write_text(tiny_text_spec().tokenizer_json)
    with pytest.raises(InputError, match="4096 tokens, the model's vocabulary 512"):
        read_text_spec(files.directory, small)


def test_only_stage_zero_carries_the_tokenizer(tmp_path: Path) -> None:
    plan = make_plan(tiny_request("t", stages=2), preset_topology(1, "dev-whole-ops"))
    directory = checkpoint(tmp_path, {"eos_token_id": 2})
    refs = compile_plan(plan, TINY, directory, tmp_path / "store")
    plain = compile_plan(plan, TINY, SEED, tmp_path / "plain")
    for ref, other in zip(refs, plain, strict=True):
        _, view = read_shard(ref.path.read_bytes())
        program = load_shard(ref.path.read_bytes())
        if ref.binding.stage == 0:
            assert TOKENIZER_KEY in view.metadata and GENERATION_KEY in view.metadata
            assert program.text == TextSpec(tiny_text_spec().tokenizer_json, (2,))
            assert ref.shard_id != other.shard_id
        else:  # the same bytes as without a tokenizer: weights from the same seed, same dtype
            assert program.text is None and ref.shard_id == other.shard_id


# --- through an agent -------------------------------------------------------------------------


@dataclass
class Served:
    agent: AgentProcess
    reference: ReferenceExecutor
    codec: TextCodec


def serve(
    cluster: AgentCluster, agent: AgentProcess, tmp: Path, name: str, text: TextSpec, chip0: int
) -> None:
    plan = make_plan(tiny_request(name, stages=2), preset_topology(1, "dev-whole-ops"))
    refs = compile_plan(plan, TINY, SEED, tmp / name, text=text)
    where = {r.chip: (agent.address, chip0 + r.binding.stage) for r in refs}
    bring_up_replica(plan, refs, where, cluster.channels(), nodes=cluster.nodes())


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, agent_cluster: AgentCluster
) -> Iterator[Served]:
    tmp = tmp_path_factory.mktemp("text")
    cluster = agent_cluster
    agent = cluster.start("n0", extra=["--sram-bytes", "64MiB"])
    serve(cluster, agent, tmp, "words", tiny_text_spec(), 0)
    reference = ReferenceExecutor(
        TINY, SeededWeights(TINY, SEED, "F16"), max_batch=4, max_context=64
    )
    codec = TextCodec(tiny_text_spec())
    # A second deployment whose EOS is the first token the model will generate.
    first = reference.generate(codec.encode(PROMPT), 1).tokens[0]
    serve(cluster, agent, tmp, "stops", TextSpec(tiny_text_spec().tokenizer_json, (first,)), 2)
    yield Served(agent, reference, codec)


def test_text_in_text_out(served: Served) -> None:
    request = agent_pb2.GenerateRequest(
        deployment="words", request_id="t1", prompt_text=PROMPT, max_tokens=12
    )
    replies = list(served.agent.stub.Generate(request, timeout=60))
    tokens = [r.token for r in replies]
    want = served.reference.generate(served.codec.encode(PROMPT), 12).tokens
    assert tokens == list(want) and replies[-1].finished
    assert "".join(r.text for r in replies) == served.codec.decode(tokens)
    # prompt_ids requests carry no text (the client did not ask for text)
    ids = agent_pb2.GenerateRequest(
        deployment="words", request_id="t2", prompt_ids=[5], max_tokens=2
    )
    assert all(r.text == "" for r in served.agent.stub.Generate(ids, timeout=60))


def test_generation_stops_on_the_models_eos(served: Served) -> None:
    request = agent_pb2.GenerateRequest(
        deployment="stops", request_id="e1", prompt_text=PROMPT, max_tokens=12
    )
    replies = list(served.agent.stub.Generate(request, timeout=60))
    assert len(replies) == 1 and replies[0].finished and replies[0].index == 0


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt_text": "hi", "prompt_ids": [1]}, "not both"),
        ({"prompt_text": "x" * ((1 << 20) + 1)}, "exceeds"),
        ({"prompt_text": "hi", "max_tokens": 64}, "maxContext"),
    ],
)
def test_bad_text_requests_are_invalid_argument(
    served: Served, fields: dict[str, object], words: str
) -> None:
    request = agent_pb2.GenerateRequest(
        deployment="words", request_id="bad", **({"max_tokens": 2} | fields)
    )
    with pytest.raises(grpc.RpcError) as info:
        list(served.agent.stub.Generate(request, timeout=60))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in str(info.value.details())
