"""Framed links: the stage-to-stage Link over plain TCP (mutual TLS) with length-prefixed frames.

Why beside the gRPC Link (`agents.interconnect`): one 16 KiB frame one way over the gRPC
stream costs 0.15-0.26 ms here, most of it HTTP/2 and the gRPC Python threads and queues, while
a raw TCP round trip of the same bytes costs 0.03-0.04 ms. This transport keeps what the Link
guarantees — mutual TLS with the cluster's certificates, the configured upstream's identity and
the replica's link secret (constant time), the same frame checks with the same status codes
(`LinkService.check_frame`: target, CRC-32, epoch, credit window, slot) — and drops the rest:
frames are written by the sending stage's own thread and read by one thread per connection,
which hands them straight to the stage; acknowledgements are written by the receiving stage's
thread. `bench/lockstep.py` measures both transports and the raw TCP baselines in one run.

Wire format. Every message is an 8-byte header — magic `LW`, version 1, kind, body length
(uint32, little-endian) — then the body:

* HELLO (client, first and once): flags (PROBE: a ping-only connection), secret length,
  deployment length, replica, stage, sender incarnation, the link secret, the deployment
  (UTF-8). It names the connection's target, as the gRPC stream's metadata does.
* ACCEPT (server): the hello passed; frames may flow.
* FRAME (client): replica, stage, epoch, tick, slot (-1: none), flags (HEARTBEAT, PING),
  CRC-32, sent_ns, then the payload. The CRC is `interconnect.frame_checksum` of the frame with
  the connection's deployment: the bytes checked are the ones the gRPC Link checks.
* ACK (server): epoch, tick, received_ns (a ping's receive time, else 0): one credit back.
* END (server, last): a gRPC status code and a message — why the connection ends.

Bounds, all in `AgentSettings`: a connection's TLS handshake and hello must complete within
`link_handshake_timeout` (capped by the idle timeout), the hello is at most `HELLO_LIMIT` bytes,
a frame at most `link_max_frame_bytes` (a larger length prefix is RESOURCE_EXHAUSTED before a
byte of it is read; bodies are read as they arrive, never allocated from the prefix), a
connection with no complete message for `link_idle_timeout` ends (DEADLINE_EXCEEDED: a
slowloris dribbling bytes does not reset it), at most `link_max_connections` connections are
open in all and `link_max_connections_per_peer` per verified identity. A connection over
either bound is told so the same way: after its TLS handshake, an END RESOURCE_EXHAUSTED naming
the bound, before its hello is read; it is never counted as open. The global bound is checked
at accept (it bounds the reader threads, and a connection's identity is known only after its
handshake), so its refusals are handshaken by threads of their own, at most
`REFUSALS_AT_ONCE` at a time: beyond that a connection is closed at accept without a word
(the only refusal without an END; a flood cannot turn the refusals into the threads the bound
saves). Who may open one is `security.identity`'s table (only agents, as for `Link/Exchange`),
who may feed a stage `agents.link_auth.authorize_link`. `WireServer.refused` counts the
refusals by reason (`REFUSAL_REASONS`, the agent's metrics).

TLS: Python `ssl` over memory BIOs (`TlsChannel`), because a connection is read by one thread
and written by another (frames and heartbeats on the sender; acknowledgements and the END on
the receiver) and an OpenSSL connection must not be used by two threads at once: one lock
guards the TLS state and the socket's send side, reads happen outside it.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import grpc

from agents.errors import AgentError, ResourceExhausted
from agents.interconnect import (
    EXCHANGE,
    End,
    GrpcLink,
    LinkService,
    Target,
    link_channels,
    status_of_refusal,
)
from agents.link_auth import LinkPolicyOf, authorize_link
from agents.lockstep import Frame
from agents.pipeline import Jitter, StageRunner
from agents.settings import DEFAULT_SETTINGS, AgentSettings
from agents.streams import StreamGate
from agents.text import clip
from protos import agent_pb2, agent_pb2_grpc, interconnect_pb2
from security.certs import Credentials
from security.identity import check_call, dns_name
from security.tls import open_channel, ssl_context, ssl_peer_identity

log = logging.getLogger("lockstep.wire")

MAGIC, VERSION = b"LW", 1
HEAD = struct.Struct("<2sBBI")  # magic, version, kind, body length
HELLO, ACCEPT, FRAME, ACK, END = 1, 2, 3, 4, 5
KINDS = {HELLO: "HELLO", ACCEPT: "ACCEPT", FRAME: "FRAME", ACK: "ACK", END: "END"}
HELLO_BODY = struct.Struct("<BBHIIQ")  # flags, secret len, deployment len, replica, stage, inc.
PROBE = 1
FRAME_BODY = struct.Struct("<IIQqiBIq")  # replica, stage, epoch, tick, slot, flags, crc, sent_ns
HEARTBEAT, PING = 1, 2
ACK_BODY = struct.Struct("<Qqq")  # epoch, tick, received_ns
END_BODY = struct.Struct("<B")  # gRPC status code value, then the message (UTF-8)
MAX_DEPLOYMENT_BYTES = 1024
HELLO_LIMIT = HELLO_BODY.size + 255 + MAX_DEPLOYMENT_BYTES
END_LIMIT = 4096  # what a client reads of an END (the server sends at most ~1 KiB)
MESSAGE_LIMIT = 1000
CONNECT_TIMEOUT = 10.0
SEND_TIMEOUT = 30.0  # a sender's write to a receiver that reads nothing fails after this
REFUSALS_AT_ONCE = 8  # connections over `link_max_connections` handshaken to be told why
# Why a connection was refused (`WireServer.refused`): over the global bound, over the
# per-identity bound, its TLS handshake failed or stalled (or the peer left before finishing
# it), its hello was refused (an END before ACCEPT: not a link message, unauthorized, no such
# stage, no hello in time, ...).
MAX_CONNECTIONS, MAX_PER_PEER, HANDSHAKE, HELLO_REFUSED = (
    "max_connections",
    "max_connections_per_peer",
    "tls_handshake",
    "hello",
)
REFUSAL_REASONS = (MAX_CONNECTIONS, MAX_PER_PEER, HANDSHAKE, HELLO_REFUSED)
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class WireError(Exception):
    """A connection ends: `code` and `message` are what its peer is told in the END."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Closed(ConnectionError):
    """The peer closed the connection (`partial`: in the middle of a message)."""

    def __init__(self, message: str, partial: bool = False) -> None:
        super().__init__(message)
        self.partial = partial


# --- encoding (pure) --------------------------------------------------------------------------


def message(kind: int, body: bytes | bytearray | memoryview = b"") -> bytes:
    return HEAD.pack(MAGIC, VERSION, kind, len(body)) + bytes(body)


def hello(
    deployment: str, replica: int, stage: int, incarnation: int, secret: bytes, probe: bool = False
) -> bytes:
    name = deployment.encode()
    return message(
        HELLO,
        HELLO_BODY.pack(PROBE if probe else 0, len(secret), len(name), replica, stage, incarnation)
        + secret
        + name,
    )


def frame_message(
    deployment: str, replica: int, stage: int, frame: Frame, flags: int = 0, sent_ns: int = 0
) -> bytes:
    slot = -1 if frame.slot is None else frame.slot
    crc = checksum(deployment, replica, stage, frame.epoch, frame.tick, slot, frame.payload)
    return message(
        FRAME,
        FRAME_BODY.pack(replica, stage, frame.epoch, frame.tick, slot, flags, crc, sent_ns)
        + frame.payload,
    )


def checksum(
    deployment: str,
    replica: int,
    stage: int,
    epoch: int,
    tick: int,
    slot: int,
    payload: bytes,
) -> int:
    """`interconnect.frame_checksum` of the same frame, without building the protobuf (the
    flags are not covered, as there)."""
    header = struct.pack("<IIQqi", replica, stage, epoch, tick, slot)
    return zlib.crc32(payload, zlib.crc32(deployment.encode() + header))


def end_message(code: grpc.StatusCode, text: str) -> bytes:
    return message(END, END_BODY.pack(code.value[0]) + clip(text, MESSAGE_LIMIT).encode())


def parse_end(body: bytes) -> tuple[grpc.StatusCode, str]:
    if len(body) < END_BODY.size:
        return grpc.StatusCode.UNKNOWN, "a malformed END"
    (value,) = END_BODY.unpack_from(body)
    return _CODES.get(value, grpc.StatusCode.UNKNOWN), body[END_BODY.size :].decode(
        "utf-8", "replace"
    )


@dataclass(frozen=True)
class Hello:
    target: Target | None  # None: a probe connection (pings only)
    secret: bytes


def parse_hello(body: bytes) -> Hello:
    """The hello's target and secret; `WireError` INVALID_ARGUMENT naming what is wrong."""
    if len(body) < HELLO_BODY.size:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "hello shorter than its fixed part")
    flags, secret_len, name_len, replica, stage, incarnation = HELLO_BODY.unpack_from(body)
    if len(body) != HELLO_BODY.size + secret_len + name_len:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"hello of {len(body)} bytes; its lengths say "
            f"{HELLO_BODY.size + secret_len + name_len}",
        )
    if flags & ~PROBE:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown hello flags {flags:#x}")
    secret = body[HELLO_BODY.size : HELLO_BODY.size + secret_len]
    if flags & PROBE:
        if name_len or secret_len:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT, "a probe hello names no target and no secret"
            )
        return Hello(None, b"")
    if not 0 < name_len <= MAX_DEPLOYMENT_BYTES:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"hello names no deployment, or one over {MAX_DEPLOYMENT_BYTES} bytes",
        )
    try:
        deployment = body[HELLO_BODY.size + secret_len :].decode("utf-8")
    except UnicodeDecodeError:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "hello deployment is not UTF-8") from None
    if incarnation >= 2**63:
        raise WireError(
            grpc.StatusCode.INVALID_ARGUMENT, "hello incarnation must be a non-negative int64"
        )
    return Hello(Target(deployment, replica, stage, incarnation), bytes(secret))


def link_frame_of(deployment: str, body: bytes) -> interconnect_pb2.LinkFrame:
    """The FRAME body as the gRPC Link's message, for `LinkService.check_frame`."""
    if len(body) < FRAME_BODY.size:
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, "frame shorter than its header")
    replica, stage, epoch, tick, slot, flags, crc, sent_ns = FRAME_BODY.unpack_from(body)
    if flags & ~(HEARTBEAT | PING):
        raise WireError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown frame flags {flags:#x}")
    return interconnect_pb2.LinkFrame(
        deployment=deployment,
        replica=replica,
        to_stage=stage,
        epoch=epoch,
        tick=tick,
        slot=slot,
        payload=body[FRAME_BODY.size :],
        checksum=crc,
        heartbeat=bool(flags & HEARTBEAT),
        ping=bool(flags & PING),
        sent_ns=sent_ns,
    )


# --- channels: plain TCP or TLS over memory BIOs ----------------------------------------------


class Channel(Protocol):
    def send(self, data: bytes) -> None: ...

    def recv(self, deadline: float) -> bytes: ...

    def shutdown(self) -> None: ...


class PlainChannel:
    """A TCP socket: `send` under a lock (messages never interleave), `recv` by one reader."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def send(self, data: bytes) -> None:
        with self.lock:
            self.sock.sendall(data)

    def recv(self, deadline: float) -> bytes:
        data = _recv_some(self.sock, deadline)
        if not data:
            raise Closed("the peer closed the connection")
        return data

    def shutdown(self) -> None:
        _shutdown(self.sock)


class TlsChannel:
    """TLS over memory BIOs on a blocking socket (see the module docstring)."""

    def __init__(
        self,
        sock: socket.socket,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
    ) -> None:
        self.sock = sock
        self.lock = threading.Lock()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )

    def handshake(self, deadline: float) -> None:
        while True:
            with self.lock:
                try:
                    self.tls.do_handshake()
                    self._flush()
                    return
                except ssl.SSLWantReadError:
                    self._flush()
            self._feed(deadline)

    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.sock.sendall(data)

    def _feed(self, deadline: float) -> None:
        data = _recv_some(self.sock, deadline)
        if not data:
            raise Closed("the peer closed the connection")
        with self.lock:
            self._in.write(data)

    def send(self, data: bytes) -> None:
        with self.lock:
            self.tls.write(data)
            self._flush()

    def recv(self, deadline: float) -> bytes:
        """The plaintext of every whole TLS record received so far (a 16 KiB frame spans two
        records: one call, one lock round, returns both when both are in)."""
        while True:
            with self.lock:
                chunks = []
                while True:
                    try:
                        data = self.tls.read(1 << 18)
                    except ssl.SSLWantReadError:
                        break
                    if not data:
                        raise Closed("the peer closed the TLS session")
                    chunks.append(data)
                if chunks:
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
                self._flush()  # TLS 1.3 post-handshake messages may want an answer
            self._feed(deadline)

    def peer_identity(self) -> str | None:
        return ssl_peer_identity(self.tls)

    def shutdown(self) -> None:
        _shutdown(self.sock)


def blocking(sock: socket.socket, send_timeout: float) -> socket.socket:
    """Put a connection in blocking mode for good, with a kernel send timeout.

    A connection is read by one thread and written by another, so neither may call
    `settimeout`: it is one setting of the whole socket (and flips O_NONBLOCK), so a writer's
    timeout would become the reader's. Reads wait with `poll` up to their own deadline
    (`_wait_readable`); writes are bounded by SO_SNDTIMEO (a write stuck that long fails with
    an OSError), which Python does not see or change."""
    sock.settimeout(None)
    seconds = int(send_timeout)
    micros = int((send_timeout - seconds) * 1e6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, struct.pack("ll", seconds, micros))
    return sock


def _recv_some(sock: socket.socket, deadline: float) -> bytes:
    """What `sock` has to read, waiting up to `deadline`: first without waiting (MSG_DONTWAIT:
    under traffic the bytes are usually there, one system call), then `poll`, then read."""
    if deadline != float("inf"):
        try:
            return sock.recv(1 << 18, socket.MSG_DONTWAIT)
        except BlockingIOError:
            pass
        _wait_readable(sock, deadline)
    return sock.recv(1 << 18)


def _wait_readable(sock: socket.socket, deadline: float) -> None:
    """Wait until `sock` has something to read (or its peer closed it): `TimeoutError` past
    `deadline` (infinite: wait for good)."""
    left = _remaining(deadline)
    if left is None:
        return
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    if not poller.poll(max(1, int(left * 1000))):
        raise TimeoutError("deadline passed")


def _remaining(deadline: float) -> float | None:
    if deadline == float("inf"):
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


def _shutdown(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class Reader:
    """Whole messages from a channel, each bounded before a byte of its body is kept."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.buf = bytearray()

    def read(self, deadline: float, limit: int) -> tuple[int, bytes]:
        """(kind, body) of the next message; `WireError` for a header that is not ours or a
        body over `limit`, `TimeoutError` past `deadline`, `Closed` at the peer's end."""
        self._fill(HEAD.size, deadline, started=bool(self.buf))
        magic, version, kind, length = HEAD.unpack_from(self.buf)
        if magic != MAGIC or version != VERSION or kind not in KINDS:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "not a Lockstep link message (bad magic, version or kind)",
            )
        if length > limit:
            raise WireError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{KINDS[kind]} of {length} bytes is over the limit of {limit}",
            )
        self._fill(HEAD.size + length, deadline, started=True)
        body = bytes(self.buf[HEAD.size : HEAD.size + length])
        del self.buf[: HEAD.size + length]
        return kind, body

    def _fill(self, n: int, deadline: float, *, started: bool) -> None:
        while len(self.buf) < n:
            try:
                self.buf += self.channel.recv(deadline)
            except Closed:
                if started or self.buf:
                    raise Closed(
                        f"connection closed inside a message ({len(self.buf)} of {n} bytes)",
                        partial=True,
                    ) from None
                raise


# --- the receiving side -----------------------------------------------------------------------


class WireServer:
    """The framed link listener of one agent, feeding `links`' stages (see the module doc).

    `policy_of` gives a stage's (upstream identity, link secret), as for the gRPC Link; with
    `creds` None the port is plaintext and every peer may feed every stage (`--insecure`)."""

    def __init__(
        self,
        links: LinkService,
        policy_of: LinkPolicyOf,
        creds: Credentials | None,
        settings: AgentSettings = DEFAULT_SETTINGS,
    ) -> None:
        self.links = links
        self.policy_of = policy_of
        self.settings = settings
        self.ctx = None if creds is None else ssl_context(creds, server_side=True)
        # Its total never reaches `link_max_connections`: the accept loop admits no more
        # (`_conns` counts every admitted connection, the gate only those past the handshake),
        # so the gate refuses per peer only.
        self.gate = StreamGate(
            settings.link_max_connections, settings.link_max_connections_per_peer
        )
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()  # admitted: counted against the bound
        self._refusing: set[socket.socket] = set()  # over the bound, being told so
        self._refusers = threading.BoundedSemaphore(REFUSALS_AT_ONCE)
        self._refused: Counter[str] = Counter({reason: 0 for reason in REFUSAL_REASONS})
        self._closed = False
        self._listener: socket.socket | None = None
        self.port = 0

    @property
    def handshake_timeout(self) -> float:
        return min(self.settings.link_handshake_timeout, self.settings.link_idle_timeout)

    def listen(self, host: str, port: int = 0) -> int:
        """Bind HOST:port (0: any free port), start accepting; returns the port."""
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            listener.bind((host, port))
            listener.listen(128)
        except OSError:
            listener.close()
            raise
        self._listener = listener
        self.port = listener.getsockname()[1]
        threading.Thread(target=self._accept, name="wire-accept", daemon=True).start()
        return self.port

    def close(self) -> None:
        """Stop accepting and end every connection."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns | self._refusing), set()
        if self._listener is not None:
            _shutdown(self._listener)
            self._listener.close()
        for conn in conns:
            _shutdown(conn)

    def open_connections(self) -> int:
        """Connections admitted and not yet ended (those being refused are not counted)."""
        with self._lock:
            return len(self._conns)

    def refused(self) -> dict[str, int]:
        """Connections refused so far, by reason (`REFUSAL_REASONS`, every one present)."""
        with self._lock:
            return dict(self._refused)

    def count_refusal(self, reason: str) -> None:
        with self._lock:
            self._refused[reason] += 1

    def _accept(self) -> None:
        assert self._listener is not None
        limit = self.settings.link_max_connections
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                admitted = len(self._conns) < limit
                told = False
                if admitted:
                    self._conns.add(conn)
                else:
                    self._refused[MAX_CONNECTIONS] += 1
                    told = self._refusers.acquire(blocking=False)
                    if told:
                        self._refusing.add(conn)
            if admitted:
                threading.Thread(
                    target=self._serve, args=(conn,), name="wire-conn", daemon=True
                ).start()
            elif told:
                threading.Thread(
                    target=self._refuse, args=(conn,), name="wire-refuse", daemon=True
                ).start()
            else:
                log.warning(
                    "framed link connection closed at accept: %d open (link_max_connections) "
                    "and %d refusals under way already",
                    limit,
                    REFUSALS_AT_ONCE,
                )
                conn.close()

    def _handshake(self, conn: socket.socket) -> tuple[Channel, str | None, float]:
        """The connection's channel, its peer's verified identity (None: plaintext) and the
        deadline of its hello, once its TLS handshake is done (OSError when it fails, stalls
        past the handshake timeout or the peer leaves)."""
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        blocking(conn, self.settings.link_idle_timeout)
        deadline = time.monotonic() + self.handshake_timeout
        if self.ctx is None:
            return PlainChannel(conn), None, deadline
        tls = TlsChannel(conn, self.ctx, server_side=True)
        tls.handshake(deadline)
        return tls, tls.peer_identity(), deadline

    def _serve(self, conn: socket.socket) -> None:
        try:
            try:
                channel, identity, deadline = self._handshake(conn)
            except OSError as exc:
                # The TLS handshake failed (no or a foreign certificate), stalled, or the peer
                # left before saying anything: there is no one to tell.
                self.count_refusal(HANDSHAKE)
                log.warning(
                    "framed link connection ended before its hello: %s", clip(str(exc), 300)
                )
                return
            Connection(self, channel, identity, deadline).run()
        except OSError as exc:
            log.warning("framed link connection broke: %s", clip(str(exc), 300))
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _refuse(self, conn: socket.socket) -> None:
        """Tell a connection over `link_max_connections` why, as `Connection.run` tells one
        over the per-peer bound: an END RESOURCE_EXHAUSTED after its handshake; nothing of it
        is read or counted as open."""
        limit = self.settings.link_max_connections
        try:
            channel, identity, deadline = self._handshake(conn)
            Connection(self, channel, identity, deadline).end(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"framed link: {limit} connections are open, the most this agent allows in "
                f"all (link_max_connections {limit}); retry when one ends",
            )
        except OSError as exc:
            log.warning(
                "framed link connection over link_max_connections ended before it could be "
                "told: %s",
                clip(str(exc), 300),
            )
        finally:
            with self._lock:
                self._refusing.discard(conn)
            self._refusers.release()
            conn.close()


class Connection:
    """One accepted, handshaken connection: hello, authorization, then frames."""

    def __init__(
        self, server: WireServer, channel: Channel, identity: str | None, deadline: float
    ) -> None:
        self.server = server
        self.channel = channel
        self.identity = identity
        self.deadline = deadline
        self.reader = Reader(channel)
        self.node = server.links.node
        self._ended = threading.Event()
        # One callable for the stage's upstream binding: the stage tells its bound stream by
        # identity (`StageRunner.on_frame(via=...)`), and each `self.send_ack` is a new object.
        self.ack = self.send_ack

    def end(self, code: grpc.StatusCode, text: str) -> None:
        """Tell the peer why (once) and close; safe from any thread."""
        if self._ended.is_set():
            return
        self._ended.set()
        log.warning("framed link refused: %s %s", code.name, clip(text, MESSAGE_LIMIT))
        with contextlib.suppress(OSError):
            self.channel.send(end_message(code, f"node {self.node}: {text}"))
        self.channel.shutdown()

    def send_ack(self, tick: int, epoch: int) -> None:
        # A connection that is gone raises: its reader notices and unbinds the stage.
        with contextlib.suppress(OSError):
            self.channel.send(message(ACK, ACK_BODY.pack(epoch, tick, 0)))

    def run(self) -> None:
        peer = self.identity or "plaintext"
        try:
            self.server.gate.enter(peer, "framed link")
        except ResourceExhausted as exc:
            self.server.count_refusal(MAX_PER_PEER)
            self.end(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
            return
        opened: tuple[Target, StageRunner] | None = None
        accepted = False
        try:
            opened = self._open()
            self.channel.send(message(ACCEPT))
            accepted = True
            self._frames(opened)
        except WireError as exc:
            self._refused(accepted)
            self.end(exc.code, exc.message)
        except TimeoutError:
            self._refused(accepted)
            what = "hello" if opened is None else "frame"
            limit = (
                self.server.handshake_timeout
                if opened is None
                else self.server.settings.link_idle_timeout
            )
            self.end(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no {what} for {limit} s: link connection ended",
            )
        except Closed as exc:
            if exc.partial:
                self._refused(accepted)
                self.end(grpc.StatusCode.INVALID_ARGUMENT, f"truncated message: {exc}")
        except OSError as exc:
            log.warning("framed link connection broke: %s", clip(str(exc), 300))
        finally:
            self._ended.set()
            if opened is not None:
                opened[1].unbind_upstream(self.ack)
            self.server.gate.leave(peer)
            self.channel.shutdown()

    def _refused(self, accepted: bool) -> None:
        """Count an END before the ACCEPT as a refused hello (after it, a rejected frame is
        counted by the link service, as on the gRPC Link)."""
        if not accepted:
            self.server.count_refusal(HELLO_REFUSED)

    def _open(self) -> tuple[Target, StageRunner] | None:
        kind, body = self.reader.read(self.deadline, HELLO_LIMIT)
        if kind != HELLO:
            raise WireError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the first message must be a HELLO, got {KINDS[kind]}",
            )
        if self.server.ctx is not None:
            refusal = check_call(EXCHANGE, self.identity)
            if refusal is not None:
                raise WireError(getattr(grpc.StatusCode, refusal.code), refusal.message)
        greeting = parse_hello(body)
        target = greeting.target
        if target is None:
            return None
        runner = self.server.links.resolve(target.deployment, target.replica, target.stage)
        if runner is None:
            raise WireError(
                grpc.StatusCode.NOT_FOUND,
                f"no stage {target.stage} of {target.deployment[:200]!r} replica "
                f"{target.replica} is configured here",
            )
        if self.server.ctx is not None:
            try:
                authorize_link(self.server.policy_of, runner, self.identity, greeting.secret)
            except AgentError as exc:
                raise WireError(status_of_refusal(exc), exc.message) from None
        refusal_text = runner.bind_upstream(
            target.incarnation, self.ack, self._stopped, self._stopped
        )
        if refusal_text is not None:
            raise WireError(grpc.StatusCode.FAILED_PRECONDITION, refusal_text)
        return target, runner

    def _stopped(self, reason: str) -> None:
        """The stage stopped or another stream replaced this one: end with ABORTED."""
        self.end(grpc.StatusCode.ABORTED, reason)

    def _frames(self, opened: tuple[Target, StageRunner] | None) -> None:
        links = self.server.links
        idle = self.server.settings.link_idle_timeout
        limit = self.server.settings.link_max_frame_bytes
        deployment = "" if opened is None else opened[0].deployment
        while not self._ended.is_set():
            kind, body = self.reader.read(time.monotonic() + idle, limit)
            if kind != FRAME:
                raise WireError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"only FRAME messages follow the hello, got {KINDS[kind]}",
                )
            msg = link_frame_of(deployment, body)
            ended: End | None = links.check_frame(msg, opened, self.ack)
            if ended is not None:
                links.count_rejection(ended.code)
                raise WireError(ended.code, ended.message)
            if msg.ping:
                self.channel.send(
                    message(ACK, ACK_BODY.pack(msg.epoch, msg.tick, time.monotonic_ns()))
                )


# --- the sending side -------------------------------------------------------------------------


def advertised_port(address: str, creds: Credentials | None, peer: str | None) -> int:
    """The downstream agent's link port from its `Status` (an agent identity may call it);
    0 when it serves none."""
    with open_channel(address, creds, peer=peer) as channel:
        status = agent_pb2_grpc.AgentStub(channel).Status(
            agent_pb2.StatusRequest(), timeout=CONNECT_TIMEOUT
        )
    return int(status.link_port)


def connect(
    host: str,
    port: int,
    creds: Credentials | None,
    peer: str | None,
    ctx: ssl.SSLContext | None = None,
) -> Channel:
    """A handshaken channel to a link port: mutual TLS as `creds` expecting the server to be
    `peer` (any agent of the cluster when None), plaintext when `creds` is None."""
    from security.identity import ANY_AGENT_DNS

    sock = socket.create_connection((host.strip("[]"), port), timeout=CONNECT_TIMEOUT)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        blocking(sock, SEND_TIMEOUT)
        if creds is None:
            return PlainChannel(sock)
        ctx = ctx or ssl_context(creds, server_side=False)
        tls = TlsChannel(
            sock,
            ctx,
            server_side=False,
            server_hostname=dns_name(peer) if peer else ANY_AGENT_DNS,
        )
        tls.handshake(time.monotonic() + CONNECT_TIMEOUT)
        return tls
    except BaseException:
        sock.close()
        raise


def expect_accept(reader: Reader) -> None:
    """Wait for the server's answer to a hello: ACCEPT, or `WireError` with its END."""
    kind, body = reader.read(time.monotonic() + CONNECT_TIMEOUT, END_LIMIT)
    if kind == END:
        raise WireError(*parse_end(body))
    if kind != ACCEPT:
        raise WireError(grpc.StatusCode.INTERNAL, f"expected ACCEPT, got {KINDS[kind]}")


class FramedLink:
    """The sending end of a framed link to a stage on another agent (a `FrameSink`).

    Like `GrpcLink`: it opens at the first frame (the downstream agent knows the replica only
    after it is configured), names its target and `incarnation` in its hello, sends heartbeats
    while idle and calls `on_ack`/`on_error`. It first asks the downstream agent's `Status` for
    its link port; with `fallback` a peer that advertises none (or cannot be asked) is served
    over a `GrpcLink` instead. Frames are written by the caller's thread (the stage's): the
    credit window bounds how much can be in flight, so a write waits only while the socket
    buffer is full; a write that fails stops the stage with the error.
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
        creds: Credentials | None,
        peer: str | None,
        secret: bytes = b"",
        jitter_ms: float = 0.0,
        seed: int = 0,
        incarnation: int | None = None,
        heartbeat: float = DEFAULT_SETTINGS.link_heartbeat,
        fallback: bool = True,
    ) -> None:
        self._address = address
        self._route = (deployment, replica, to_stage)
        self._on_ack = on_ack
        self._on_error = on_error
        self._creds = creds
        self._peer = peer
        self._secret = secret
        self._heartbeat = heartbeat
        self._fallback = fallback
        self.incarnation = time.time_ns() if incarnation is None else incarnation
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._channel: Channel | None = None
        self._grpc: GrpcLink | None = None
        self._last_send = time.monotonic()
        self._jitter = Jitter(self._put, jitter_ms, seed) if jitter_ms > 0 else None
        self.transport = ""  # "framed" or "grpc" once open

    def send(self, frame: Frame) -> None:
        if self._jitter is not None:
            self._jitter.send(frame)
        else:
            self._put(frame)

    def _put(self, frame: Frame) -> None:
        channel = self._channel
        if channel is None:
            channel = self._open()
            if channel is None:  # the gRPC fallback
                assert self._grpc is not None
                self._grpc.send(frame)
                return
        channel.send(frame_message(*self._route, frame))
        self._last_send = time.monotonic()

    def _open(self) -> Channel | None:
        with self._lock:
            if self._channel is not None:
                return self._channel
            if self._grpc is not None:
                return None
            if self._closing.is_set():
                raise ConnectionError("the link is closed")
            host = self._address.rsplit(":", 1)[0]
            try:
                port = advertised_port(self._address, self._creds, self._peer)
            except grpc.RpcError as exc:
                if not self._fallback:
                    raise ConnectionError(
                        f"cannot ask {self._address} for its link port: {exc.code().name}"
                    ) from None
                port = 0
            if port == 0:
                if not self._fallback:
                    raise ConnectionError(f"{self._address} serves no framed link port")
                if self._closing.is_set():
                    raise ConnectionError("the link is closed")
                self._grpc = self._grpc_link()
                if self._closing.is_set():  # close() may have missed it
                    self._grpc.close()
                    raise ConnectionError("the link is closed")
                self.transport = "grpc"
                log.info("link to stage %d at %s: gRPC", self._route[2], self._address)
                return None
            channel = connect(host, port, self._creds, self._peer)
            try:
                deployment, replica, stage = self._route
                channel.send(hello(deployment, replica, stage, self.incarnation, self._secret))
                reader = Reader(channel)
                expect_accept(reader)
            except WireError as exc:
                channel.shutdown()
                raise ConnectionError(f"{exc.code.name} {exc.message}") from None
            except BaseException:
                channel.shutdown()
                raise
            self._channel = channel
            if self._closing.is_set():  # closed while connecting (close() may have missed it)
                channel.shutdown()
                raise ConnectionError("the link is closed")
            self.transport = "framed"
            log.info(
                "link to stage %d at %s: framed on port %d", self._route[2], self._address, port
            )
        threading.Thread(
            target=self._read_acks, args=(reader,), name=f"wire-acks-{stage}", daemon=True
        ).start()
        threading.Thread(target=self._beat, name=f"wire-beat-{stage}", daemon=True).start()
        return channel

    def _grpc_link(self) -> GrpcLink:
        return GrpcLink(
            self._address,
            *self._route,
            on_ack=self._on_ack,
            on_error=self._on_error,
            incarnation=self.incarnation,
            heartbeat=self._heartbeat,
            channel_factory=link_channels(self._creds, self._peer),
            secret=self._secret,
        )

    def _read_acks(self, reader: Reader) -> None:
        why = "the connection closed"
        try:
            while True:
                kind, body = reader.read(float("inf"), END_LIMIT)
                if kind == ACK and len(body) == ACK_BODY.size:
                    epoch, tick, _ = ACK_BODY.unpack(body)
                    self._on_ack(tick, epoch)
                elif kind == END:
                    code, text = parse_end(body)
                    why = f"{code.name} {text}"
                    break
                else:
                    why = f"unexpected {KINDS[kind]} from the receiver"
                    break
        except (WireError, OSError) as exc:
            why = f"{type(exc).__name__}: {exc}"
        if not self._closing.is_set():
            self._on_error(f"link to stage {self._route[2]} at {self._address} broke: {why}")

    def _beat(self) -> None:
        deployment, replica, stage = self._route
        beat = frame_message(deployment, replica, stage, Frame(0, 0, None, b""), HEARTBEAT)
        while not self._closing.wait(self._heartbeat / 2):
            if time.monotonic() - self._last_send < self._heartbeat:
                continue
            channel = self._channel
            if channel is None:
                return
            try:
                channel.send(beat)
            except OSError:
                return  # the ack reader reports the broken connection
            self._last_send = time.monotonic()

    def close(self) -> None:
        """Stop sending and close the connection. Does not wait for an `_open` in progress
        (it holds the lock through the network round trips; it checks `_closing` after)."""
        self._closing.set()
        if self._jitter is not None:
            self._jitter.close()
        channel, link = self._channel, self._grpc
        if channel is not None:
            channel.shutdown()
        if link is not None:
            link.close()


def ping(
    host: str, port: int, count: int, payload_bytes: int, creds: Credentials | None = None
) -> tuple[list[float], list[float]]:
    """`interconnect.ping` over the framed transport: a probe connection, `count` frames of
    `payload_bytes` one at a time, each waiting for its ACK; one-way and round-trip latencies
    in ms (the host-wide monotonic clock), the first frame (set-up) not counted."""
    channel = connect(host, port, creds, None)
    reader = Reader(channel)
    try:
        channel.send(hello("", 0, 0, 0, b"", probe=True))
        expect_accept(reader)
        payload = bytes(payload_bytes)
        one_way, round_trip = [], []
        for tick in range(count + 1):
            data = frame_message("", 0, 0, Frame(0, tick, None, payload), PING)
            sent = time.monotonic_ns()  # after the CRC, as `interconnect.ping` stamps
            channel.send(data)
            kind, body = reader.read(time.monotonic() + 120, END_LIMIT)
            now = time.monotonic_ns()
            if kind == END:
                raise WireError(*parse_end(body))
            _, acked, received = ACK_BODY.unpack(body)
            if acked != tick:
                raise WireError(grpc.StatusCode.INTERNAL, f"ACK of tick {acked}, sent {tick}")
            if tick > 0:
                one_way.append((received - sent) / 1e6)
                round_trip.append((now - sent) / 1e6)
        return one_way, round_trip
    finally:
        channel.shutdown()
