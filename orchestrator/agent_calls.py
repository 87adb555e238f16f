"""Many agent calls at once, from one event loop: the control plane's bulk path to agents.

A 405B deployment at full size is 3,736 shard loads and, per bring-up or failover, a
`ConfigureReplica` and a `StartEpoch` on each of its 233 agents. Through gRPC's synchronous
API each stream-unary load starts a thread to feed its request stream, and every call hands
its answer across threads under the GIL: measured at 3,736 chips, the control plane's load
path ran about 90 loads a second on a busy core, most of it in that hand-off. Here the calls
are coroutines on one event loop in one daemon thread (`grpc.aio` channels, one per agent,
with the same mutual TLS identity and peer check as `agent_client.dial`): no thread per call,
and the callers get `concurrent.futures.Future`s, so the controller's threads neither block
on nor spawn anything per call.

Bounds: at most `max_in_flight` loads stream at once (the others wait in order for a slot),
each with its own deadline; a unary batch (`call_all`) runs at most `fan_out` calls at once.
`close()` cancels what is in flight and closes every channel.

A blob's chunks are read from the shard store inside the loop (`file_messages`, lazily, a
chunk at a time): reads of the page-cached store take well under a millisecond per MiB, and
a virtual shard is a single chunk of a few kB. An agent that refuses a load at its header (no
SRAM, a bad field) ends the call while chunks may still be going out; when a write loses that
race, `grpc.aio` records its own INTERNAL ("Internal error from Core") over the agent's status
and reason. That load is then asked again once through the synchronous API (`load_file`, on a
worker thread), which keeps the agent's answer: a refusal is deterministic, so the caller
sees the agent's own code and reason (tested), and a load that fits by then simply loads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc

from orchestrator.agent_client import (
    blob_manifest,
    channel_options,
    dial,
    file_messages,
    load_file,
    make_file_header,
)
from protos import agent_pb2, agent_pb2_grpc
from protos.load_stream import LOAD_METHOD
from security.certs import Credentials
from security.identity import agent_identity
from security.tls import channel_credentials, target_options

_T = TypeVar("_T")

MAX_LOADS_IN_FLIGHT = 64
FAN_OUT = 256  # unary calls of one batch running at once (a 405B replica: 234 agents)


def _lost_to_a_write(exc: grpc.RpcError) -> bool:
    """Whether `exc` is grpc.aio's own INTERNAL for a write that failed because the call had
    ended (its details are "Internal error from Core"), not a status the agent sent."""
    return exc.code() is grpc.StatusCode.INTERNAL and "from Core" in str(exc.details())


class AgentCalls:
    """One event loop thread with a `grpc.aio` channel per agent (see the module docstring)."""

    def __init__(
        self,
        credentials: Credentials | None,
        *,
        max_in_flight: int = MAX_LOADS_IN_FLIGHT,
        fan_out: int = FAN_OUT,
    ) -> None:
        self.credentials = credentials
        self.fan_out = fan_out
        self._max_in_flight = max_in_flight
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}  # node -> (address, ch)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="agent-calls", daemon=True)
        self._thread.start()
        self._ready.wait()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._slots = asyncio.Semaphore(self._max_in_flight)
        self._ready.set()
        self._loop.run_forever()

    # --- the public calls (any thread) --------------------------------------------------------

    def load(
        self, address: str, node: str, chip: int, path: Path, shard_id: str, timeout: float
    ) -> Future[agent_pb2.LoadShardResponse]:
        """Stream the shard-store blob at `path` onto `chip` of `node`'s agent (`load_file`'s
        header and stream); the future holds the agent's answer or its `grpc.RpcError`."""
        return self._submit(self._load(address, node, chip, path, shard_id, timeout))

    def call_all(
        self,
        method: str,
        requests: Mapping[str, Any],
        nodes: Mapping[str, str],
        timeout: float,
    ) -> Future[dict[str, Any | grpc.RpcError]]:
        """The unary `method` (an `agent_pb2_grpc.AgentStub` attribute, e.g. "StartEpoch") on
        every agent address in `requests`, at most `fan_out` at once; each address's answer or
        its `grpc.RpcError` (a failed call does not stop the others)."""
        return self._submit(self._call_all(method, requests, nodes, timeout))

    def close(self) -> None:
        """Cancel what runs, close every channel, stop the loop thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        done = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
        try:
            done.result(timeout=10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # --- inside the loop --------------------------------------------------------------------

    def _submit(self, work: Coroutine[Any, Any, _T]) -> Future[_T]:
        with self._lock:
            if self._closed:
                work.close()
                raise RuntimeError("the agent call loop is closed")
            return asyncio.run_coroutine_threadsafe(work, self._loop)

    def _channel(self, address: str, node: str) -> grpc.aio.Channel:
        known = self._channels.get(node)
        if known is not None and known[0] == address:
            return known[1]
        if known is not None:  # the agent moved: the old channel's calls end with it
            self._loop.create_task(known[1].close())
        options = channel_options()
        if self.credentials is None:
            channel = grpc.aio.insecure_channel(address, options=options)
        else:
            channel = grpc.aio.secure_channel(
                address,
                channel_credentials(self.credentials),
                options=[*options, *target_options(agent_identity(node))],
            )
        self._channels[node] = (address, channel)
        return channel

    async def _load(
        self, address: str, node: str, chip: int, path: Path, shard_id: str, timeout: float
    ) -> agent_pb2.LoadShardResponse:
        async with self._slots:
            manifest = blob_manifest(path)
            header = make_file_header(
                path,
                chip,
                shard_id=shard_id,
                virtual=manifest.virtual,
                declared_bytes=manifest.declared_bytes,
            )
            call = self._channel(address, node).stream_unary(
                LOAD_METHOD,
                request_serializer=None,
                response_deserializer=agent_pb2.LoadShardResponse.FromString,
            )
            stream = call(timeout=timeout)
            try:
                for message in file_messages(header, path):
                    await stream.write(message)
                await stream.done_writing()
            except asyncio.InvalidStateError:
                pass  # the agent ended the call before the stream did: its status follows
            except grpc.RpcError as exc:
                if not _lost_to_a_write(exc):
                    raise
                # The agent ended the call (a refusal) while a chunk was going out, and
                # grpc.aio recorded its own INTERNAL over the agent's status: ask again
                # through the synchronous API, which keeps it (the same refusal, normally).
                return await asyncio.to_thread(
                    self._load_sync, address, node, chip, path, shard_id, timeout
                )
            reply: agent_pb2.LoadShardResponse = await stream
            return reply

    def _load_sync(
        self, address: str, node: str, chip: int, path: Path, shard_id: str, timeout: float
    ) -> agent_pb2.LoadShardResponse:
        with dial(address, self.credentials, node) as channel:
            return load_file(channel, path, chip, shard_id=shard_id, timeout=timeout)

    async def _call_all(
        self,
        method: str,
        requests: Mapping[str, Any],
        nodes: Mapping[str, str],
        timeout: float,
    ) -> dict[str, Any | grpc.RpcError]:
        slots = asyncio.Semaphore(self.fan_out)

        async def one(address: str) -> Any:
            stub = agent_pb2_grpc.AgentStub(self._channel(address, nodes[address]))
            rpc: Callable[..., Awaitable[Any]] = getattr(stub, method)
            async with slots:
                try:
                    return await rpc(requests[address], timeout=timeout)
                except grpc.RpcError as exc:
                    return exc

        addresses = list(requests)
        answers = await asyncio.gather(*(one(a) for a in addresses))
        return dict(zip(addresses, answers, strict=True))

    async def _shutdown(self) -> None:
        current = asyncio.current_task()
        tasks = [t for t in asyncio.all_tasks(self._loop) if t is not current]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
