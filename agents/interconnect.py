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

Who may feed a stage: a stream names its target (deployment, replica, stage) and its sender's
incarnation once, in its metadata (`target_metadata`). `LinkService` resolves the stage at
open, asks its `authorize(context, runner)` hook whether the peer may feed it (default: allow;
with TLS the peer certificate and the replica's link secret decide), binds the stream as the
stage's upstream only if its incarnation is newer than any bound before, and then checks every
frame before the stage sees it (target, checksum, then the stage core's epoch, credit window
and slot). The status codes are listed in `protos/interconnect.proto`.

Threads: the sender's stream is fed from a queue (`send` never blocks on the network) and sends
heartbeats while idle; one thread per link reads acknowledgements. On the server side one
thread per stream reads frames and hands them to the stage (`StageRunner.on_frame` only takes a
lock), while the handler's own thread writes the acknowledgements back and ends the stream
after `idle_timeout` without a frame.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import grpc

from agents.errors import (
    AgentError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from agents.lockstep import Frame
from agents.pipeline import Jitter, StageRunner
from agents.settings import DEFAULT_SETTINGS
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


TARGET_KEY = "x-lockstep-target"
INCARNATION_KEY = "x-lockstep-incarnation"


def target_metadata(
    deployment: str, replica: int, to_stage: int, incarnation: int
) -> tuple[tuple[str, str], ...]:
    """The invocation metadata that names a stream's target stage and sender incarnation
    (the deployment percent-encoded: metadata values are printable ASCII)."""
    target = f"{quote(deployment, safe='')}/{replica}/{to_stage}"
    return ((TARGET_KEY, target), (INCARNATION_KEY, str(incarnation)))


@dataclass(frozen=True)
class Target:
    deployment: str
    replica: int
    stage: int
    incarnation: int

    def names(self, msg: interconnect_pb2.LinkFrame) -> bool:
        return (msg.deployment, msg.replica, msg.to_stage) == (
            self.deployment,
            self.replica,
            self.stage,
        )


class BadMetadata(ValueError):
    """A stream's target or incarnation metadata is malformed."""


def parse_target(metadata: Iterable[tuple[str, str | bytes]]) -> Target | None:
    """The stream's target from its invocation metadata; None for a probe-only stream."""
    found = {k: v for k, v in metadata if k in (TARGET_KEY, INCARNATION_KEY)}
    raw = found.get(TARGET_KEY)
    if raw is None:
        if INCARNATION_KEY in found:
            raise BadMetadata(f"{INCARNATION_KEY} without {TARGET_KEY}")
        return None
    incarnation = found.get(INCARNATION_KEY)
    if not isinstance(raw, str) or not isinstance(incarnation, str):
        raise BadMetadata(f"{TARGET_KEY} and {INCARNATION_KEY} must both be given, as text")
    parts = raw.rsplit("/", 2)
    if len(raw) > 1024 or len(parts) != 3:
        raise BadMetadata(f"{TARGET_KEY} must be <deployment>/<replica>/<stage> (at most 1 KiB)")
    deployment = unquote(parts[0])
    try:
        replica, stage, number = int(parts[1]), int(parts[2]), int(incarnation)
    except ValueError:
        raise BadMetadata(
            f"{TARGET_KEY} replica and stage, and {INCARNATION_KEY}, must be integers"
        ) from None
    if not deployment or not 0 <= replica < 2**32 or not 0 <= stage < 2**32:
        raise BadMetadata(f"{TARGET_KEY} names no deployment, or a replica/stage out of range")
    if not 0 <= number < 2**63:
        raise BadMetadata(f"{INCARNATION_KEY} must be a non-negative int64")
    return Target(deployment, replica, stage, number)


def _stream(channel: grpc.Channel) -> Callable[..., Any]:
    return channel.stream_stream(
        EXCHANGE,
        request_serializer=interconnect_pb2.LinkFrame.SerializeToString,
        response_deserializer=interconnect_pb2.LinkAck.FromString,
    )


def link_channels(
    creds: Credentials | None = None, peer: str | None = None
) -> Callable[[str], grpc.Channel]:
    """A channel factory for links: mutual TLS with this agent's `creds`, the downstream
    agent's certificate checked against `peer` (its identity); plaintext when `creds` is None."""
    return lambda address: open_channel(address, creds, peer=peer, options=LINK_OPTIONS)


insecure_link_channel = link_channels()


class GrpcLink:
    """The sending end of a link to a stage on another agent (a `FrameSink`).

    The stream opens at the first frame, not at construction: a replica's agents are
    configured one after the other, and the downstream agent may not know the replica yet
    when this one is configured (frames flow only after StartEpoch's barrier, when every agent
    does). The stream names its target and this link's `incarnation` in its metadata; the
    default incarnation is the wall clock in ns at construction, so a link built later (a
    restarted or reconfigured sender) replaces an earlier one. While there is nothing to send
    a heartbeat goes out every `heartbeat` seconds, inside the receiver's idle timeout.
    `channel_factory(address)` makes the channel (plaintext by default; TLS passes its own).
    """

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
        incarnation: int | None = None,
        heartbeat: float = DEFAULT_SETTINGS.link_heartbeat,
        channel_factory: Callable[[str], grpc.Channel] = insecure_link_channel,
        secret: bytes = b"",
    ) -> None:
        """`channel_factory`: see `link_channels`; `secret`: the replica's link secret, sent
        in the stream's metadata (the receiver also checks this agent's certificate)."""
        self._secret = secret
        self._route = (deployment, replica, to_stage)
        self._address = address
        self._on_ack = on_ack
        self._on_error = on_error
        self._heartbeat = heartbeat
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        self._closing = False
        self._lock = threading.Lock()
        self._out: queue.SimpleQueue[interconnect_pb2.LinkFrame | None] = queue.SimpleQueue()
        self._jitter = Jitter(self._put, jitter_ms, seed) if jitter_ms > 0 else None
        self._channel = channel_factory(address)
        self._responses: Any = None

    def send(self, frame: Frame) -> None:
        if self._jitter is not None:
            self._jitter.send(frame)
        else:
            self._put(frame)

    def _put(self, frame: Frame) -> None:
        self._open()
        self._out.put(link_frame(*self._route, frame))

    def _open(self) -> None:
        with self._lock:
            if self._responses is not None or self._closing:
                return
            self._responses = _stream(self._channel)(
                self._requests(),
                metadata=(
                    *target_metadata(*self._route, self.incarnation),
                    *link_metadata(self._secret),
                ),
            )
        threading.Thread(
            target=self._read_acks, name=f"link-acks-{self._route[2]}", daemon=True
        ).start()

    def _requests(self) -> Iterator[interconnect_pb2.LinkFrame]:
        deployment, replica, to_stage = self._route
        while True:
            try:
                msg = self._out.get(timeout=self._heartbeat)
            except queue.Empty:
                beat = interconnect_pb2.LinkFrame(
                    deployment=deployment, replica=replica, to_stage=to_stage, heartbeat=True
                )
                beat.checksum = frame_checksum(beat)
                yield beat
                continue
            if msg is None:
                return
            yield msg

    def _read_acks(self) -> None:
        try:
            for ack in self._responses:
                self._on_ack(ack.tick, ack.epoch)
        except grpc.RpcError as exc:
            if not self._closing:
                self._on_error(
                    f"link to stage {self._route[2]} at {self._address} broke: "
                    f"{exc.code().name} {exc.details()}"
                )

    def close(self) -> None:
        with self._lock:
            self._closing = True
            responses = self._responses
        if self._jitter is not None:
            self._jitter.close()
        self._out.put(None)
        if responses is not None:
            responses.cancel()
        self._channel.close()


@dataclass(frozen=True)
class End:
    """Why a link stream ends: the status code and message its peer gets."""

    code: grpc.StatusCode
    message: str


Authorize = Callable[[grpc.ServicerContext, StageRunner], None]


def allow_all(context: grpc.ServicerContext, runner: StageRunner) -> None:
    """The default `authorize`: any peer may feed any stage (plaintext, loopback)."""


_ERROR_CODES: dict[type[AgentError], grpc.StatusCode] = {
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    NotFound: grpc.StatusCode.NOT_FOUND,
}


def status_of_refusal(exc: AgentError) -> grpc.StatusCode:
    """The status an `authorize` refusal ends a link with (PERMISSION_DENIED by default)."""
    return next(
        (c for t, c in _ERROR_CODES.items() if isinstance(exc, t)),
        grpc.StatusCode.PERMISSION_DENIED,
    )


class LinkService:
    """The receiving side: `resolve(deployment, replica, stage)` finds the stage runner.

    A stream is resolved once, at open, from its metadata (`target_metadata`), then
    `authorize(context, runner)` decides whether this peer may feed that stage (it aborts the
    context, or raises `PermissionDenied`/`Unauthenticated`; the default allows all), then the
    stream binds as the stage's upstream (`StageRunner.bind_upstream`: only a newer
    incarnation replaces a bound stream). Every frame is then checked before the stage sees
    it: it must name the stream's target, pass its checksum and be admitted by the stage
    (epoch, credit window, slot — `agents.stage_core`). A violation ends the stream with the
    status of the table in `protos/interconnect.proto`. A stream that sends nothing for
    `idle_timeout` seconds ends with DEADLINE_EXCEEDED.
    """

    def __init__(
        self,
        resolve: Callable[[str, int, int], StageRunner | None],
        node: str,
        *,
        authorize: Authorize = allow_all,
        idle_timeout: float = DEFAULT_SETTINGS.link_idle_timeout,
    ) -> None:
        self.resolve = resolve
        self.node = node
        self.authorize = authorize
        self.idle_timeout = idle_timeout
        self._lock = threading.Lock()
        self._open: set[queue.SimpleQueue[interconnect_pb2.LinkAck | End | None]] = set()
        self._closed = False
        # Frames refused (the stream then ends), by status code name, for the agent's
        # metrics. Counted under `_lock`: a rejection ends its stream, so it is never hot.
        self._rejected: Counter[str] = Counter()

    def close(self) -> None:
        """End every open stream (agent shutdown) and refuse new ones."""
        with self._lock:
            self._closed = True
            streams, self._open = list(self._open), set()
        for acks in streams:
            acks.put(None)

    def count_rejection(self, code: grpc.StatusCode) -> None:
        """One frame refused (its stream or connection then ends), for the agent's metrics."""
        with self._lock:
            self._rejected[code.name] += 1

    def frames_rejected(self) -> dict[str, int]:
        """Frames refused so far, by the status code their stream ended with (a copy)."""
        with self._lock:
            return dict(self._rejected)

    def _abort(self, context: grpc.ServicerContext, code: grpc.StatusCode, message: str) -> None:
        if len(message) > 1000:
            message = message[:1000] + "..."
        log.warning("link stream refused: %s %s", code.name, message)
        context.abort(code, f"node {self.node}: {message}")

    def _open_stream(self, context: grpc.ServicerContext) -> tuple[Target, StageRunner] | None:
        """Resolve and authorize the stream's target (aborting the call when refused)."""
        try:
            target = parse_target(context.invocation_metadata())
        except BadMetadata as exc:
            self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            raise AssertionError("unreachable: context.abort raises") from None
        if target is None:
            return None
        runner = self.resolve(target.deployment, target.replica, target.stage)
        if runner is None:
            self._abort(
                context,
                grpc.StatusCode.NOT_FOUND,
                f"no stage {target.stage} of {target.deployment[:200]!r} replica "
                f"{target.replica} is configured here",
            )
        assert runner is not None
        try:
            self.authorize(context, runner)
        except AgentError as exc:
            self._abort(context, status_of_refusal(exc), exc.message)
        return target, runner

    def Exchange(
        self, requests: Iterator[interconnect_pb2.LinkFrame], context: grpc.ServicerContext
    ) -> Iterator[interconnect_pb2.LinkAck]:
        acks: queue.SimpleQueue[interconnect_pb2.LinkAck | End | None] = queue.SimpleQueue()
        with self._lock:
            if self._closed:
                context.abort(grpc.StatusCode.UNAVAILABLE, f"node {self.node} is stopping")
        opened = self._open_stream(context)

        def send_ack(tick: int, epoch: int) -> None:
            acks.put(interconnect_pb2.LinkAck(epoch=epoch, tick=tick))

        def end(code: grpc.StatusCode) -> Callable[[str], None]:
            return lambda message: acks.put(End(code, message))

        if opened is not None:
            target, runner = opened
            refusal = runner.bind_upstream(
                target.incarnation,
                send_ack,
                end(grpc.StatusCode.ABORTED),
                end(grpc.StatusCode.ABORTED),
            )
            if refusal is not None:
                self._abort(context, grpc.StatusCode.FAILED_PRECONDITION, refusal)
        with self._lock:
            self._open.add(acks)
        seen = [time.monotonic()]
        threading.Thread(
            target=self._read,
            args=(requests, acks, opened, send_ack, seen),
            name="link-frames",
            daemon=True,
        ).start()
        poll = min(1.0, self.idle_timeout / 4)
        try:
            while True:
                try:
                    item = acks.get(timeout=poll)
                except queue.Empty:
                    if time.monotonic() - seen[0] > self.idle_timeout:
                        self._abort(
                            context,
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            f"no frame for {self.idle_timeout} s: link stream ended",
                        )
                    continue
                if item is None:
                    return
                if isinstance(item, End):
                    self._abort(context, item.code, item.message)
                yield item
        finally:
            with self._lock:
                self._open.discard(acks)
            if opened is not None:
                opened[1].unbind_upstream(send_ack)

    def _read(
        self,
        requests: Iterator[interconnect_pb2.LinkFrame],
        acks: queue.SimpleQueue[interconnect_pb2.LinkAck | End | None],
        opened: tuple[Target, StageRunner] | None,
        send_ack: Callable[[int, int], None],
        seen: list[float],
    ) -> None:
        try:
            for msg in requests:
                seen[0] = time.monotonic()
                end = self.check_frame(msg, opened, send_ack)
                if end is not None:
                    self.count_rejection(end.code)
                    acks.put(end)
                    return
                if msg.ping:
                    acks.put(
                        interconnect_pb2.LinkAck(
                            epoch=msg.epoch, tick=msg.tick, received_ns=time.monotonic_ns()
                        )
                    )
        except grpc.RpcError:
            pass  # the sender went away; its stage notices on its side
        finally:
            if opened is not None:  # a later stream may bind the stage: stop feeding this one
                opened[1].unbind_upstream(send_ack)
            acks.put(None)

    def check_frame(
        self,
        msg: interconnect_pb2.LinkFrame,
        opened: tuple[Target, StageRunner] | None,
        send_ack: Callable[[int, int], None],
    ) -> End | None:
        """Check one frame and hand it to the stage; the end of the stream if refused (the
        framed transport, `agents.wire`, runs its frames through here too)."""
        intact = frame_checksum(msg) == msg.checksum
        if opened is None:
            if not msg.ping:
                return End(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"stage frames need the {TARGET_KEY} and {INCARNATION_KEY} metadata",
                )
            if not intact:
                return End(grpc.StatusCode.DATA_LOSS, f"probe frame {msg.tick} failed its checksum")
            return None
        target, runner = opened
        if msg.ping:
            return End(grpc.StatusCode.INVALID_ARGUMENT, "probe frames on a stage stream")
        if not target.names(msg):
            return End(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"frame of tick {msg.tick} names {msg.deployment[:200]!r} replica "
                f"{msg.replica} stage {msg.to_stage}; the stream's target is "
                f"{target.deployment[:200]!r} replica {target.replica} stage {target.stage}",
            )
        if not intact:
            error = (
                f"{runner.label}: frame of tick {msg.tick} from stage "
                f"{runner.machine.schedule.upstream(target.stage)} failed its checksum "
                "(corrupted on the link)"
            )
            runner.fail_via(send_ack, error)
            return End(grpc.StatusCode.DATA_LOSS, error)
        if msg.heartbeat:
            if msg.payload:
                return End(grpc.StatusCode.INVALID_ARGUMENT, "a heartbeat carries no payload")
            return None
        slot = None if msg.slot < 0 else msg.slot
        rejected = runner.on_frame(Frame(msg.epoch, msg.tick, slot, msg.payload), via=send_ack)
        if rejected is not None:
            return End(getattr(grpc.StatusCode, rejected.code.value), rejected.reason)
        return None


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
