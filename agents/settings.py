"""Every tunable default of the node agent, in one frozen object.

`AgentSettings()` is what `lpuctl agent` runs with; tests and benchmarks pass a modified copy
(`dataclasses.replace`). Nothing else in `agents/` keeps a default of its own: a module that
needs a bound takes the settings (or the one field) from its caller.

This module imports nothing but the standard library on purpose: `lpuctl` builds its `agent`
flags from these defaults without importing gRPC or numpy, and without touching BLAS.
"""

from __future__ import annotations

from dataclasses import dataclass

LINK_TRANSPORTS = ("auto", "framed", "grpc")


@dataclass(frozen=True)
class AgentSettings:
    """Defaults and bounds of one agent (see the README's agent section for the reasons).

    Streams. A streaming RPC (LoadShard, Generate, Link/Exchange) holds one server worker
    thread for as long as it is open, whether or not its client sends anything. So the number
    of open streams is bounded per peer and in all, checked when a stream starts (a stream
    over a bound fails at once with RESOURCE_EXHAUSTED). The control plane's streams (at most
    `max_streams_per_peer`) are not counted in `max_streams`, so other agents cannot take the
    places it needs; the worker pool has room for both plus `unary_reserve` threads: Status,
    health and the other unary calls always find a free worker, however many hostile streams
    are open.
    """

    # --- execution ---------------------------------------------------------------------------
    blas_threads: int = 1  # deterministic reductions: one BLAS thread per kernel call
    max_execute_bytes: int = 8 << 20  # an Execute activation larger is INVALID_ARGUMENT

    # --- shard loads -------------------------------------------------------------------------
    load_idle_timeout: float = 60.0  # seconds a load may go without a message (header included)

    # --- pipeline and links ------------------------------------------------------------------
    window: int = 2  # default credit window W when ConfigureReplica leaves it 0
    chain_log_limit: int = 4096  # (tick, head) pairs a stage keeps for resume and comparison
    # A stage of a ring longer than that keeps one ring period plus this many ticks (at most
    # `max_stage_log`): see `stage_log_limit`.
    stage_log_slack: int = 256
    max_stage_log: int = 1 << 16
    # InjectFault (flip a bit of a stage's output) is refused unless the agent was started
    # with --allow-fault-injection: a test door that production agents keep shut.
    allow_fault_injection: bool = False
    queue_factor: int = 4  # ConfigureReplica queue_limit 0: this many x maxBatch may wait
    # A Link stream that sends no frame for this long is ended (DEADLINE_EXCEEDED): a peer
    # cannot hold a server thread with a silent stream. Senders of idle (but healthy) links
    # send a heartbeat every `link_heartbeat` seconds, well inside it. Streams of the open
    # services (health Watch, reflection) end after it too (`agents.server.StreamLimit`).
    link_idle_timeout: float = 30.0
    link_heartbeat: float = 5.0
    # Links between agents: "framed" (`agents.wire`: length-prefixed frames over TCP with
    # mutual TLS, measured faster, see bench/lockstep.py), "grpc" (the Link/Exchange stream),
    # or "auto": framed when the downstream agent advertises a link port, else gRPC.
    # ConfigureReplica's `link_transport` overrides it per replica.
    link_transport: str = "auto"
    # The framed link port (on the gRPC listen host): 0 any free port, None none (links into
    # this agent then go over gRPC; senders on "auto" fall back to it).
    link_port: int | None = 0
    # The framed link port's bounds: the largest frame (as the gRPC Link's message limit), the
    # time a connection has for its TLS handshake and hello (at most the idle timeout), and
    # the connections open at once, in all and per peer identity (one reader thread each).
    link_max_frame_bytes: int = 64 << 20
    link_handshake_timeout: float = 10.0
    link_max_connections: int = 128
    link_max_connections_per_peer: int = 32
    # ConfigureReplica bounds. The window bounds what a stage buffers (W frames of upstream
    # ticks), so an unbounded one would let a peer fill memory with future frames again; the
    # jitter (a test hook) is slept by a link thread, which a huge value would kill.
    max_window: int = 1024
    max_jitter_ms: float = 10_000.0

    # --- LinkPing (a diagnostic: bounded so it cannot be used to fill memory or a CPU) -------
    ping_max_count: int = 10_000
    ping_max_payload_bytes: int = 1 << 20

    # --- streams and the worker pool ---------------------------------------------------------
    max_streams: int = 64  # open streaming RPCs in all
    max_streams_per_peer: int = 32  # open streaming RPCs of one peer (`agents.server.peer_key`)
    unary_reserve: int = 16  # workers beyond max_streams, kept for unary calls and refusals

    # --- messages ----------------------------------------------------------------------------
    text_limit: int = 200  # characters of a client-supplied string echoed in errors and logs

    # --- control plane -----------------------------------------------------------------------
    heartbeat_interval: float = 0.5  # seconds between heartbeats to the control plane

    # --- security ----------------------------------------------------------------------------

    def __post_init__(self) -> None:
        for name in (
            "blas_threads",
            "max_execute_bytes",
            "window",
            "chain_log_limit",
            "stage_log_slack",
            "max_stage_log",
            "queue_factor",
            "ping_max_count",
            "max_window",
            "max_streams",
            "max_streams_per_peer",
            "unary_reserve",
            "text_limit",
            "link_max_frame_bytes",
            "link_max_connections",
            "link_max_connections_per_peer",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"AgentSettings.{name} must be at least 1")
        if not self.heartbeat_interval > 0:
            raise ValueError("AgentSettings.heartbeat_interval must be positive")
        if not self.load_idle_timeout > 0:
            raise ValueError("AgentSettings.load_idle_timeout must be positive")
        if not 0 <= self.max_jitter_ms < float("inf"):
            raise ValueError("AgentSettings.max_jitter_ms must be finite and not negative")
        if self.link_transport not in LINK_TRANSPORTS:
            raise ValueError(
                f"AgentSettings.link_transport must be one of {', '.join(LINK_TRANSPORTS)}"
            )
        if self.link_port is not None and not 0 <= self.link_port <= 65535:
            raise ValueError("AgentSettings.link_port must be a port (0: any free one) or None")
        if not self.link_handshake_timeout > 0:
            raise ValueError("AgentSettings.link_handshake_timeout must be positive")
        if self.ping_max_payload_bytes < 0:
            raise ValueError("AgentSettings.ping_max_payload_bytes must not be negative")

    def stage_log_limit(self, stages: int, slots: int) -> int:
        """The chain and digest log length of one stage of a ring of `stages` stages and
        `slots` sequence slots (ring period P = max(stages, slots)): `chain_log_limit`, or
        P + `stage_log_slack` (at most `max_stage_log`) if that is more.

        Why a period more. The canary (`orchestrator.core.canary`) compares a stage's outputs
        at the ticks one request occupied, and the control plane learns those ticks from the
        request's tokens; the last comes back one whole period after the last output, so a
        log shorter than P holds none of them on any stage (a 1,868-stage replica against a
        256-tick log). P + slack holds at least the last output of every stage when the
        control plane asks (the slack: ticks other requests run meanwhile), so a one-token
        canary — the prefill — fits; the verifier shortens its canary to what was held.

        Memory, per stage: entries x ~291 bytes (one (tick, head) and one (tick, digest)
        tuple per tick, measured with tracemalloc), so 4,096 entries ~1.2 MB, P = 1,868:
        2,124 entries ~0.62 MB (an 8-chip agent: 8 stages, ~5 MB; a simulated fleet holding
        all 1,868 stages of a replica in one process: ~1.15 GB per replica, against ~140 MB
        at 256 entries); the cap, 65,536 entries, is ~19 MB.
        """
        period = max(stages, slots)
        return max(self.chain_log_limit, min(period + self.stage_log_slack, self.max_stage_log))

    @property
    def workers(self) -> int:
        """The server's worker pool: every allowed stream (the control plane's included) plus
        the unary reserve."""
        return self.max_streams + self.max_streams_per_peer + self.unary_reserve


DEFAULT_SETTINGS = AgentSettings()
