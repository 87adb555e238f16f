"""Stage-to-stage links over gRPC: `lockstep.interconnect.v1.Link/Exchange`.

One link is one bidirectional stream, opened by the agent hosting the sending stage to the
agent hosting its downstream stage. Frames go down in tick order (HTTP/2 keeps a stream's
order); each carries a CRC-32 over its header and payload, checked on receipt — a mismatch is
a detected corruption: the receiving stage stops, its status and the stream's DATA_LOSS status
name the chip and the tick. The receiver acknowledges every frame its stage consumed (one
credit back, `LinkAck`) on the same stream.

Why CRC-32 (zlib) and not a cryptographic digest: the link guards against accidental damage,
not an adversary, and zlib.crc32 runs at ~4 GB/s on one core (machine-facts.md), far below a
frame's cost; the per-chip hash chains (sha256) are the end-to-end check.

Threads: the sender's stream is fed from a queue (`send` never blocks on the network); one
thread per link reads acknowledgements. On the server side one thread per stream reads frames
and hands them to the stage (`StageRunner.on_frame` only takes a lock and notifies), while the
handler's own thread writes the acknowledgements back.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from agents.errors import AgentError, PermissionDenied
from agents.lockstep import Frame
from agents.pipeline import Jitter, StageRunner
from protos import interconnect_pb2
from security.certs import Credentials
from security.tls import link_metadata, open_channel

log = logging.getLogger("lockstep.link")

SERVICE_NAME = interconnect_pb2.DESCRIPTOR.services_by_name["Link"].full_name
EXCHANGE = f"/{SERVICE_NAME}/Exchange"
_HEADER = struct.Struct("<IIQqi")
LINK_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
]


def frame_checksum(msg: interconnect_pb2.LinkFrame) -> int:
    """CRC-32 over the frame's routing header, epoch, tick, slot and payload."""
    header = _HEADER.pack(msg.replica, msg.to_stage, msg.epoch, msg.tick, msg.slot)
    crc = zlib.crc32(msg.deployment.encode() + header)
    return zlib.crc32(msg.payload, crc)


def link_frame(
    deployment: str, replica: int, to_stage: int, frame: Frame
) -> interconnect_pb2.LinkFrame:
    msg = interconnect_pb2.LinkFrame(
        deployment=deployment,
        replica=replica,
        to_stage=to_stage,
        epoch=frame.epoch,
        tick=frame.tick,
        slot=-1 if frame.slot is None else frame.slot,
        payload=frame.payload,
    )
    msg.checksum = frame_checksum(msg)
    return msg


def _stream(channel: grpc.Channel) -> Callable[..., Any]:
    return channel.stream_stream(
        EXCHANGE,
        request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
        response_deserializer=interconnect_pb2.LinkAck.FromString,
    )


class GrpcLink:
    """The sending end of a link to a stage on another agent (a `FrameSink`)."""

    def __init__(
        self,
        address: str,
        deployment: str,
        replica: int,
        to_stage: int,
        *,
        on_ack: Callable[[int, int], None],
        on_error: Callable[[str], None],
        jitter_ms: float = 0.0,
        seed: int = 0,
        creds: Credentials | None = None,
        peer: str | None = None,
        secret: bytes = b"",
    ) -> None:
        """`creds`: this agent's certificate (None: plaintext); `peer`: the downstream agent's
        identity, checked against its certificate; `secret`: the replica's link secret."""
        self._route = (deployment, replica, to_stage)
        self._address = address
        self._on_error = on_error
        self._closing = False
        self._out: queue.SimpleQueue[interconnect_pb2.LinkFrame | None] = queue.SimpleQueue()
        self._jitter = Jitter(self._put, jitter_ms, seed) if jitter_ms > 0 else None
        self._channel = open_channel(address, creds, peer=peer, options=LINK_OPTIONS)
        self._responses = _stream(self._channel)(self._requests(), metadata=link_metadata(secret))
        self._reader = threading.Thread(
            target=self._read_acks, args=(on_ack,), name=f"link-acks-{to_stage}", daemon=True
        )
        self._reader.start()

    def send(self, frame: Frame) -> None:
        if self._jitter is not None:
            self._jitter.send(frame)
        else:
            self._put(frame)

    def _put(self, frame: Frame) -> None:
        self._out.put(link_frame(*self._route, frame))

    def _requests(self) -> Iterator[interconnect_pb2.LinkFrame]:
        while (msg := self._out.get()) is not None:
            yield msg

    def _read_acks(self, on_ack: Callable[[int, int], None]) -> None:
        try:
            for ack in self._responses:
                on_ack(ack.tick, ack.epoch)
        except grpc.RpcError as exc:
            if not self._closing:
                self._on_error(
                    f"link to stage {self._route[2]} at {self._address} broke: "
                    f"{exc.code().name} {exc.details()}"
                )

    def close(self) -> None:
        self._closing = True
        if self._jitter is not None:
            self._jitter.close()
        self._out.put(None)
        self._responses.cancel()
        self._channel.close()


@dataclass(frozen=True)
class _End:
    code: grpc.StatusCode
    message: str


class LinkService:
    """The receiving side: `resolve(deployment, replica, stage)` finds the stage runner."""

    def __init__(
        self,
        resolve: Callable[[str, int, int], StageRunner | None],
        node: str,
        authorize: Callable[[grpc.ServicerContext, StageRunner], None] | None = None,
    ) -> None:
        """`authorize(context, runner)` raises `AgentError` when the stream's peer may not feed
        `runner` (None: everyone may, the plaintext mode)."""
        self.resolve = resolve
        self.node = node
        self.authorize = authorize
        self._lock = threading.Lock()
        self._open: set[queue.SimpleQueue[interconnect_pb2.LinkAck | _End | None]] = set()
        self._closed = False

    def close(self) -> None:
        """End every open stream (agent shutdown) and refuse new ones."""
        with self._lock:
            self._closed = True
            streams, self._open = list(self._open), set()
        for acks in streams:
            acks.put(None)

    def Exchange(
        self, requests: Iterator[interconnect_pb2.LinkFrame], context: grpc.ServicerContext
    ) -> Iterator[interconnect_pb2.LinkAck]:
        acks: queue.SimpleQueue[interconnect_pb2.LinkAck | _End | None] = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node} is stopping")
            self._open.add(acks)
        threading.Thread(
            target=self._read, args=(requests, acks, context), name="link-frames", daemon=True
        ).start()
        try:
            while (item := acks.get()) is not None:
                if isinstance(item, _End):
                    context.abort(item.code, f"node {self.node}: {item.message}")
                yield item
        finally:
            with self._lock:
                self._open.discard(acks)

    def _read(
        self,
        requests: Iterator[interconnect_pb2.LinkFrame],
        acks: queue.SimpleQueue[interconnect_pb2.LinkAck | _End | None],
        context: grpc.ServicerContext | None = None,
    ) -> None:
        bound: StageRunner | None = None

        def send_ack(tick: int, epoch: int) -> None:
            acks.put(interconnect_pb2.LinkAck(epoch=epoch, tick=tick))

        try:
            for msg in requests:
                intact = frame_checksum(msg) == msg.checksum
                if msg.ping and not intact:
                    acks.put(
                        _End(
                            grpc.StatusCode.DATA_LOSS, f"probe frame {msg.tick} failed its checksum"
                        )
                    )
                    return
                if msg.ping:
                    acks.put(
                        interconnect_pb2.LinkAck(
                            epoch=msg.epoch, tick=msg.tick, received_ns=time.monotonic_ns()
                        )
                    )
                    continue
                runner = self.resolve(msg.deployment, msg.replica, msg.to_stage)
                if runner is None:
                    acks.put(
                        _End(
                            grpc.StatusCode.NOT_FOUND,
                            f"no stage {msg.to_stage} of {msg.deployment!r} replica "
                            f"{msg.replica} is configured here",
                        )
                    )
                    return
                if not intact:
                    error = (
                        f"{runner.label}: frame of tick {msg.tick} from stage "
                        f"{(msg.to_stage - 1) % runner.machine.schedule.stages} failed its "
                        f"checksum (corrupted on the link)"
                    )
                    runner.fail(error)
                    acks.put(_End(grpc.StatusCode.DATA_LOSS, error))
                    return
                if runner is not bound and self.authorize is not None:
                    try:
                        self.authorize(context, runner)  # type: ignore[arg-type]
                    except AgentError as exc:
                        code = (
                            grpc.StatusCode.PERMISSION_DENIED
                            if isinstance(exc, PermissionDenied)
                            else grpc.StatusCode.UNAUTHENTICATED
                        )
                        log.warning("refused a link: %s", exc.message)
                        acks.put(_End(code, exc.message))
                        return
                if runner is not bound:
                    if bound is not None:
                        bound.unbind_upstream(send_ack)
                    bound = runner
                    runner.set_upstream(
                        send_ack,
                        lambda message: acks.put(_End(grpc.StatusCode.ABORTED, message)),
                    )
                slot = None if msg.slot < 0 else msg.slot
                if not runner.on_frame(Frame(msg.epoch, msg.tick, slot, msg.payload)):
                    acks.put(_End(grpc.StatusCode.FAILED_PRECONDITION, runner.error))
                    return
        except grpc.RpcError:
            pass  # the sender went away; its stage notices on its side
        finally:
            if bound is not None:  # a later stream may bind the stage: stop feeding this one
                bound.unbind_upstream(send_ack)
            acks.put(None)


def handlers(service: LinkService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Exchange": grpc.stream_stream_rpc_method_handler(
                service.Exchange,
                request_deserializer=interconnect_pb2.LinkFrame.FromString,
                response_serializer=interconnect_pb2.LinkAck.SerializeToString,
            ),
        },
    )


def ping(
    address: str, count: int, payload_bytes: int, creds: Credentials | None = None
) -> tuple[list[float], list[float]]:
    """Probe a link: `count` frames of `payload_bytes`, one at a time, each waiting for its
    acknowledgement. Returns one-way (sent → received, the host-wide monotonic clock) and
    round-trip latencies in milliseconds. The first frame (stream set-up) is not counted.
    `creds`: this agent's certificate (mutual TLS with any agent of the cluster)."""
    payload = bytes(payload_bytes)
    go: queue.SimpleQueue[bool] = queue.SimpleQueue()
    stamps: dict[int, int] = {}

    def requests() -> Iterator[interconnect_pb2.LinkFrame]:
        for tick in range(count + 1):
            go.get()
            msg = interconnect_pb2.LinkFrame(tick=tick, payload=payload, ping=True)
            msg.checksum = frame_checksum(msg)
            msg.sent_ns = stamps[tick] = time.monotonic_ns()
            yield msg

    one_way, round_trip = [], []
    with open_channel(address, creds, options=LINK_OPTIONS) as channel:
        go.put(True)
        for ack in _stream(channel)(requests(), timeout=120):
            now = time.monotonic_ns()
            if ack.tick > 0:
                one_way.append((ack.received_ns - stamps[ack.tick]) / 1e6)
                round_trip.append((now - stamps[ack.tick]) / 1e6)
            if ack.tick == count:
                break
            go.put(True)
    return one_way, round_trip
