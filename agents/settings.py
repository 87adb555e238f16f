"""Every tunable default of the node agent, in one frozen object.

`AgentSettings()` is what `lpuctl agent` runs with; tests and benchmarks pass a modified copy
(`dataclasses.replace`). Nothing else in `agents/` keeps a default of its own: a module that
needs a bound takes the settings (or the one field) from its caller.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AgentSettings:
    """Defaults and bounds of one agent (see the README's agent section for the reasons)."""

    # --- execution ---------------------------------------------------------------------------
    blas_threads: int = 1  # deterministic reductions: one BLAS thread per kernel call

    # --- shard loads -------------------------------------------------------------------------
    load_idle_timeout: float = 60.0  # seconds a load may go without a message (header included)

    # --- pipeline and links ------------------------------------------------------------------
    window: int = 2  # default credit window W when ConfigureReplica leaves it 0
    chain_log_limit: int = 4096  # (tick, head) pairs a stage keeps for resume and comparison
    queue_factor: int = 4  # ConfigureReplica queue_limit 0: this many x maxBatch may wait
    # A Link stream that sends no frame for this long is ended (DEADLINE_EXCEEDED): a peer
    # cannot hold a server thread with a silent stream. Senders of idle (but healthy) links
    # send a heartbeat every `link_heartbeat` seconds, well inside it.
    link_idle_timeout: float = 30.0
    link_heartbeat: float = 5.0

    # --- security ----------------------------------------------------------------------------


DEFAULT_SETTINGS = AgentSettings()
