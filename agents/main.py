"""Agent entry point: `lpuctl agent --node n0 --chips 8 --profile dev --listen 127.0.0.1:0`.

Also runnable as `python -m agents.main ...` (same flags). Serves mutual TLS with the
certificates in `--certs DIR` (created on first start for the embedded default), or plaintext
behind `--insecure`, loopback only. Prints exactly one line to stdout,
`listening on HOST:PORT` with the bound port, then serves until SIGTERM or SIGINT, stops
gracefully (health NOT_SERVING, in-flight calls get a grace period) and exits 0. Logs go to
stderr.

This module is imported by `lpuctl` to build its `agent` flags, so at import time it touches
nothing: no gRPC, no numpy, no environment. `run_agent` pins BLAS to `settings.blas_threads`
(one: a threaded gemv changes result bits with the thread split, and DESIGN.md requires
deterministic kernels) before it imports the server, and with it numpy.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from agents.settings import DEFAULT_SETTINGS, LINK_TRANSPORTS, AgentSettings
from placement.profiles import profile_names

BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")

log = logging.getLogger("lockstep.agent")

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8


def tune_malloc() -> bool:
    """Keep gRPC's per-message buffers in warm heap memory (glibc only; False elsewhere).

    gRPC Python hands every received message over as a fresh `bytes` (a 1-4 MiB chunk each).
    With glibc defaults such blocks are often mmapped or trimmed and faulted in anew per
    message, and per-thread malloc arenas keep freed chunks around: a bare gRPC sink measured
    1.0-1.5 GB/s and 200-250 MB peak RSS. One malloc arena and fixed 16 MiB mmap and trim
    thresholds (so chunk-sized message buffers come from, and return to, a warm heap) made the same
    sink 1.7-2.4 GB/s at 85-125 MB. bench/shard_load.py measures its bare-gRPC baseline both
    with this tuning (like for like) and without.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return all(
        (
            mallopt(_M_ARENA_MAX, 1),
            mallopt(_M_MMAP_THRESHOLD, 16 << 20),
            mallopt(_M_TRIM_THRESHOLD, 16 << 20),
        )
    )


def parse_bytes(text: str) -> int:
    """`300MiB`, `2GiB`, `1048576` → bytes (for --sram-bytes)."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "b": 1}
    lowered = text.strip().lower()
    for suffix, factor in units.items():
        if lowered.endswith(suffix):
            number, scale = lowered[: -len(suffix)], factor
            break
    else:
        number, scale = lowered, 1
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a byte size: {text!r} (e.g. 300MiB)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def run_agent(
    node: str,
    chips: int,
    profile: str,
    listen: str,
    *,
    sram_bytes: int | None = None,
    settings: AgentSettings = DEFAULT_SETTINGS,
    certs: str | None = None,
    insecure: bool = False,
    control_plane: str | None = None,
    rack: str | None = None,
    slot: int | None = None,
    metrics_port: int | None = 0,
) -> int:
    """Serve one node's chips until SIGTERM/SIGINT; 0 on a clean stop, 2 on bad input.

    `sram_bytes` overrides the profile's SRAM per chip (tests and benchmarks that need a
    capacity between the `dev` and `groq-rack` presets); every other default and bound is in
    `settings`.

    Mutual TLS with the certificates in `certs` (default `default_certs_dir()`): the node's
    own certificate is loaded from there, and created together with the cluster CA when the
    directory has none (the embedded default; in production the control plane issues it).
    `insecure` serves plaintext with no authorization, on loopback addresses only.

    `control_plane` (HOST:PORT of its NodeRegistry) makes the agent register there and
    heartbeat every `settings.heartbeat_interval` (`agents.registration`); `rack` and `slot`
    default to what the node's name says (`rack-0/node-3`).

    `metrics_port` serves Prometheus /metrics (`agents.metrics`) on the listen host: HTTPS
    with the node's certificate (plain HTTP under `insecure`), 0 any free port, None not at
    all; the port is logged and advertised in `StatusResponse.metrics_port`.
    """
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO,
            stream=sys.stderr,
            format="%(asctime)s %(name)s %(levelname)s %(message)s",
        )
    from agents.hosted import HostedAgentError, start_agent  # the one start-up path

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        agent = start_agent(
            node,
            chips,
            profile,
            listen,
            sram_bytes=sram_bytes,
            settings=settings,
            certs=certs,
            insecure=insecure,
            control_plane=control_plane,
            rack=rack,
            slot=slot,
            metrics_port=metrics_port,
        )
    except HostedAgentError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    print(f"listening on {agent.address}", flush=True)
    stop.wait()
    log.info("node %s: stopping", node)
    agent.stop()
    return 0


def metrics_port_arg(text: str) -> int | None:
    """An argparse `type` for --metrics-port and --link-port: a port, 0 for any free one,
    `off` for none."""
    if text.strip().lower() == "off":
        return None
    return whole_number(0, 65535)(text)


def default_certs_dir() -> str:
    """`$LOCKSTEP_CERTS` or `~/.lockstep/certs`: where `lpuctl agent` finds its certificates."""
    return os.environ.get("LOCKSTEP_CERTS") or os.path.expanduser("~/.lockstep/certs")


def is_loopback_listen(listen: str) -> bool:
    """Whether HOST:PORT binds a loopback address only (`localhost`, 127.0.0.0/8, `[::1]`)."""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pin_blas(threads: int) -> None:
    """Pin BLAS threads: the environment first (it only counts before numpy is imported),
    then OpenBLAS at run time, in case numpy was imported already."""
    for var in BLAS_THREAD_VARS:
        os.environ[var] = str(threads)
    from agents.blas_threads import pin_blas_threads

    pin_blas_threads(threads)


def whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse `type` for a whole number in [low, high], with a message naming the range."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
    return value


def register_agent_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add the `agent` subcommand to an argparse subparsers object (handler: `cmd_agent`)."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "agent",
        help="run a node agent: serve this node's chips over gRPC",
        description="Run a node agent. Prints 'listening on HOST:PORT' once serving; stops "
        "gracefully on SIGTERM/SIGINT.",
    )
    parser.add_argument("--node", required=True, help="node name (as in the topology)")
    parser.add_argument("--chips", type=whole_number(1, 1024), default=8, help="chips on this node")
    parser.add_argument(
        "--profile",
        default="dev",
        choices=profile_names(),
        help="chip profile: SRAM capacity per chip (default dev)",
    )
    parser.add_argument(
        "--listen", default="127.0.0.1:0", help="HOST:PORT to serve on; port 0 picks a free port"
    )
    parser.add_argument(
        "--sram-bytes",
        type=parse_bytes,
        default=None,
        help="override the profile's SRAM per chip, e.g. 300MiB",
    )
    parser.add_argument(
        "--load-idle-timeout",
        type=_positive_seconds,
        default=DEFAULT_SETTINGS.load_idle_timeout,
        help="end a load whose client sends nothing (header or chunk) for this many seconds",
    )
    parser.add_argument(
        "--link-idle-timeout",
        type=_positive_seconds,
        default=DEFAULT_SETTINGS.link_idle_timeout,
        help="end a Link stream that sends no frame for this many seconds (this agent's "
        "links send heartbeats every quarter of it, at most every "
        f"{DEFAULT_SETTINGS.link_heartbeat:g} s)",
    )
    parser.add_argument(
        "--link-transport",
        choices=LINK_TRANSPORTS,
        default=DEFAULT_SETTINGS.link_transport,
        help="links to other agents: framed (length-prefixed frames over TCP, mutual TLS, "
        "on a port shown in Status), grpc (the Link stream), or auto: framed when the "
        "downstream agent serves it, else grpc (ConfigureReplica may choose per replica)",
    )
    parser.add_argument(
        "--link-port",
        type=metrics_port_arg,
        default=0,
        metavar="PORT|off",
        help="port of the framed link listener on the --listen host (0: any free port, shown "
        "in Status; off: none, links into this agent use gRPC)",
    )
    parser.add_argument(
        "--link-max-connections",
        type=whole_number(1, 1 << 16),
        default=DEFAULT_SETTINGS.link_max_connections,
        metavar="N",
        help="connections open at once on the framed link port, in all (one more is told "
        "RESOURCE_EXHAUSTED)",
    )
    parser.add_argument(
        "--link-max-connections-per-peer",
        type=whole_number(1, 1 << 16),
        default=DEFAULT_SETTINGS.link_max_connections_per_peer,
        metavar="N",
        help="connections open at once on the framed link port per peer identity",
    )
    parser.add_argument(
        "--control-plane",
        metavar="ADDR",
        help="HOST:PORT of the control plane's node registry: register there and heartbeat",
    )
    parser.add_argument("--rack", help="rack of this node (default: from --node, RACK/node-N)")
    parser.add_argument(
        "--slot", type=whole_number(0, 1023), help="slot in the rack (default: from --node)"
    )
    parser.add_argument(
        "--heartbeat-interval",
        type=_positive_seconds,
        default=DEFAULT_SETTINGS.heartbeat_interval,
        help="seconds between heartbeats to the control plane",
    )
    parser.add_argument(
        "--metrics-port",
        type=metrics_port_arg,
        default=0,
        metavar="PORT|off",
        help="serve Prometheus /metrics on the --listen host at this port (HTTPS with the "
        "node's certificate; 0: any free port, shown in Status; off: none)",
    )
    parser.add_argument(
        "--allow-fault-injection",
        action="store_true",
        help="accept InjectFault from the control plane (flip a bit of a stage's output; "
        "tests of silent-data-corruption detection only)",
    )
    security = parser.add_mutually_exclusive_group()
    security.add_argument(
        "--certs",
        metavar="DIR",
        help="certificate directory (default $LOCKSTEP_CERTS or ~/.lockstep/certs); the "
        "cluster CA and this node's certificate are created there if missing",
    )
    security.add_argument(
        "--insecure",
        action="store_true",
        help="serve plaintext with no authentication (loopback addresses only; prints a warning)",
    )
    parser.set_defaults(handler=cmd_agent)
    return parser


def cmd_agent(args: argparse.Namespace) -> int:
    return run_agent(
        args.node,
        args.chips,
        args.profile,
        args.listen,
        sram_bytes=args.sram_bytes,
        settings=dataclasses.replace(
            DEFAULT_SETTINGS,
            load_idle_timeout=args.load_idle_timeout,
            link_idle_timeout=args.link_idle_timeout,
            link_heartbeat=min(DEFAULT_SETTINGS.link_heartbeat, args.link_idle_timeout / 4),
            link_transport=args.link_transport,
            link_port=args.link_port,
            link_max_connections=args.link_max_connections,
            link_max_connections_per_peer=args.link_max_connections_per_peer,
            heartbeat_interval=args.heartbeat_interval,
            allow_fault_injection=args.allow_fault_injection,
        ),
        certs=args.certs,
        insecure=args.insecure,
        control_plane=args.control_plane,
        rack=args.rack,
        slot=args.slot,
        metrics_port=args.metrics_port,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agents.main")
    sub = parser.add_subparsers(dest="command")
    register_agent_command(sub)
    args = parser.parse_args(["agent", *(argv if argv is not None else sys.argv[1:])])
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
