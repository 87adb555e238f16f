"""The argument parser of lpuctl's control-plane commands, without importing them.

`lpuctl plan` must not import gRPC (a test checks it), so the commands that talk to a control
plane (`orchestrator.lpuctl_cluster`) are imported only when one of them runs. The exit codes
and `CommandError` live here so `orchestrator.cli` can report them without that import.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2
DEFAULT_STATE = "~/.lockstep/embedded"


class CommandError(Exception):
    """A command that could not be done; `code` is the exit code (1, or 2 for bad input)."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


def _lazy(
    name: str, module_name: str = "orchestrator.lpuctl_cluster"
) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(module_name)
        code: int = getattr(module, name)(args)
        return code

    return run


# --- the parser ------------------------------------------------------------------------------


def positive_seconds(text: str) -> float:
    """An argparse `type`: a finite number of seconds above the 0.5 s heartbeat interval."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, got {text!r}") from None
    if not 0.5 < value <= 3600:
        raise argparse.ArgumentTypeError(f"must be above 0.5 and at most 3600, got {text}")
    return value


def register_cluster_commands(sub: Any, parser_class: Any) -> None:
    """Add the control-plane commands to lpuctl's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", help="admin API HOST:PORT (env LOCKSTEP_SERVER)")
    common.add_argument("--token", help="bearer token (env LOCKSTEP_TOKEN)")
    common.add_argument("--ca", help="cluster CA certificate (env LOCKSTEP_CA)")
    common.add_argument(
        "--state-dir", help=f"embedded control plane's state (env LOCKSTEP_HOME; {DEFAULT_STATE})"
    )

    up = sub.add_parser("up", parents=[common], help="start the embedded control plane and agents")
    up.add_argument("--racks", type=int, default=2)
    up.add_argument("--nodes-per-rack", type=int, default=3)
    up.add_argument("--profile", default="dev")
    up.add_argument("--runtime", choices=("process", "ray", "fleet"), default="process")
    up.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="join this Ray cluster (implies --runtime ray): one agent per host that "
        "advertises a lockstep-host:<host> resource, instead of a simulated cluster",
    )
    up.add_argument(
        "--listen",
        default="127.0.0.1",
        metavar="HOST",
        help="address the control plane's admin, registry and metrics ports bind (default "
        "127.0.0.1: this machine only; with --ray-address, one the Ray hosts can reach, or "
        "0.0.0.0)",
    )
    up.add_argument(
        "--advertise",
        metavar="HOST",
        help="address agents and clients reach the control plane at (default: the --listen "
        "host, or for 0.0.0.0 this host's address on its default route)",
    )
    up.add_argument(
        "--heartbeat-timeout",
        type=positive_seconds,
        metavar="SECONDS",
        help="a node not heard from for this long is NotReady and its replicas are replaced "
        "(default 2.5; more than the 0.5 s heartbeat interval)",
    )
    up.add_argument("--timeout", type=float, default=120.0)
    up.add_argument(
        "--allow-fault-injection",
        action="store_true",
        help="start the agents with --allow-fault-injection (tests of silent-data-corruption "
        "detection only; process runtime)",
    )
    up.set_defaults(handler=_lazy("cmd_up"))
    down = sub.add_parser("down", parents=[common], help="stop the embedded control plane")
    down.set_defaults(handler=_lazy("cmd_down"))

    apply = sub.add_parser("apply", parents=[common], help="create or update deployments")
    apply.add_argument("-f", "--filename", required=True, help="a deployment file or directory")
    apply.add_argument("--wait", action="store_true", help="wait until Ready, showing progress")
    apply.add_argument("--timeout", type=float, default=120.0)
    apply.set_defaults(handler=_lazy("cmd_apply"))

    get = sub.add_parser("get", parents=[common], help="list deployments, nodes or chips")
    get.add_argument("kind", help="deployments | nodes | chips")
    get.add_argument("name", nargs="?")
    get.add_argument("-o", "--output", choices=("table", "wide", "json", "yaml"), default="table")
    get.set_defaults(handler=_lazy("cmd_get"))

    describe = sub.add_parser("describe", parents=[common], help="a deployment in detail")
    describe.add_argument("kind")
    describe.add_argument("name")
    describe.set_defaults(handler=_lazy("cmd_describe"))

    delete = sub.add_parser("delete", parents=[common], help="delete deployments")
    delete.add_argument("names", nargs="*", help="[deployment] NAME ...")
    delete.add_argument("-f", "--filename")
    delete.add_argument("--wait", action="store_true", help="wait until it is gone")
    delete.add_argument("--timeout", type=float, default=60.0)
    delete.set_defaults(handler=_lazy("cmd_delete"))

    gen = sub.add_parser("generate", parents=[common], help="generate tokens (streamed)")
    gen.add_argument("name", help="deployment")
    gen.add_argument("prompt", nargs="?", help="prompt text")
    gen.add_argument("--ids", type=int, nargs="+", help="prompt token ids instead of text")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--show-ids", action="store_true", help="print token ids, not text")
    gen.add_argument("--timeout", type=float, default=120.0)
    gen.set_defaults(handler=_lazy("cmd_generate"))

    for method in ("Cordon", "Uncordon", "Drain"):
        p = sub.add_parser(method.lower(), parents=[common], help=f"{method.lower()} a node")
        p.add_argument("node")
        if method == "Drain":
            p.add_argument(
                "--timeout",
                type=float,
                default=120.0,
                help="seconds to wait until the node holds nothing (0: do not wait)",
            )
        p.set_defaults(handler=_lazy("cmd_node"), method=method)

    events = sub.add_parser("events", parents=[common], help="events (--watch to follow)")
    events.add_argument("deployment", nargs="?")
    events.add_argument("--watch", action="store_true")
    events.set_defaults(handler=_lazy("cmd_events"))

    verify = sub.add_parser(
        "verify",
        parents=[common],
        help="run the silent-data-corruption canary through every Ready replica now",
    )
    verify.add_argument("name", help="deployment")
    verify.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    verify.add_argument("--timeout", type=float, default=300.0)
    verify.set_defaults(handler=_lazy("cmd_verify", "orchestrator.lpuctl_verify"))

    top = sub.add_parser(
        "top",
        parents=[common],
        help="SRAM and chips per node, chips and SRAM per deployment (no tokens/s yet)",
    )
    top.add_argument("-o", "--output", choices=("table", "json"), default="table")
    top.set_defaults(handler=_lazy("cmd_top", "orchestrator.lpuctl_top"))
