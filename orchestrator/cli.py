"""`lpuctl`: the operator's command line.

Exit codes (every subcommand):
  0  success (for `plan`: the deployment fits)
  1  a valid request that cannot be carried out (for `plan`: it does not fit; the reason has
     the numbers)
  2  invalid input (a bad file, flag or field; the message names the file, line and field)
  3  an internal error (a bug: reported in one line; set LPUCTL_DEBUG=1 for the traceback)

No traceback reaches the user unless asked for.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from orchestrator.certs_cmd import register_certs_command
from orchestrator.lpuctl_commands import CommandError, register_cluster_commands
from orchestrator.safe_yaml import SpecError
from orchestrator.topology_file import DEFAULT_TOPOLOGY, load_topology_file
from placement.errors import InputError, Unplaceable
from placement.profiles import profile_names
from placement.topology import MAX_RACKS, Topology, preset_topology

# Only what the parser and the error handling need is imported here: the planner (numpy),
# the spec's JSON schema and the table renderer are imported by `cmd_plan`, so a client
# command (`lpuctl get nodes`) pays only for gRPC and its own module.

EXIT_OK, EXIT_UNPLACEABLE, EXIT_INVALID, EXIT_INTERNAL = 0, 1, 2, 3
AGENT_ENTRY_MODULE = "agents.main"
"""The process entry point `lpuctl agent` runs, by name.

The control plane never imports the agent's code (an import-linter contract): `lpuctl agent
ARGS` hands ARGS to `AGENT_ENTRY_MODULE`'s `main(argv)`, imported only then, exactly as
`python -m agents.main ARGS` would run it. The agent owns its flags (and `lpuctl agent --help`
prints them), so `lpuctl plan` never loads gRPC nor pins BLAS threads."""


class _UsageError(Exception):
    """Bad flags: reported like argparse does, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lpuctl",
        description="Lockstep: place, load and serve models on racks of LPU chips.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    plan = sub.add_parser(
        "plan",
        help="show how a deployment would be split and placed, whether it fits, how fast",
        description=(
            "Plan a deployment. Without --racks or --topology the embedded default topology "
            f"is used ({DEFAULT_TOPOLOGY.describe()}). Exit 0: it fits; 1: it does not "
            "(the reason in numbers); 2: invalid input."
        ),
    )
    plan.add_argument("-f", "--filename", required=True, help="deployment YAML (LPUDeployment)")
    where = plan.add_mutually_exclusive_group()
    where.add_argument(
        "--racks", type=whole_number(1, MAX_RACKS), help="a preset topology of N full racks"
    )
    where.add_argument("--topology", help="a topology YAML file")
    plan.add_argument(
        "--profile",
        choices=profile_names(),
        help="chip profile: for --racks (default groq-rack), or alone for the embedded "
        "default's rack count",
    )
    plan.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    plan.add_argument("--svg", help="also write the rack map as SVG to this path")
    plan.set_defaults(handler=cmd_plan)
    agent = sub.add_parser(
        "agent",
        help="run a node agent: serve this node's chips over gRPC (flags: lpuctl agent --help)",
        add_help=False,
    )
    agent.set_defaults(handler=lambda _: run_agent([]))
    register_certs_command(sub)
    register_cluster_commands(sub, _Parser)
    return parser


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


def run_agent(argv: Sequence[str]) -> int:
    """Run the agent's process entry point by module name (see `AGENT_ENTRY_MODULE`)."""
    entry = importlib.import_module(AGENT_ENTRY_MODULE)
    code: int = entry.main(list(argv))
    return code


def resolve_topology(args: argparse.Namespace) -> Topology:
    if args.topology:
        if args.profile:
            raise _UsageError(
                "lpuctl plan: --profile goes with --racks, not --topology "
                "(the topology file names its profile)"
            )
        return load_topology_file(args.topology)
    if args.racks:
        return preset_topology(args.racks, args.profile or "groq-rack")
    if args.profile:
        return preset_topology(DEFAULT_TOPOLOGY.racks, args.profile)
    return DEFAULT_TOPOLOGY.build()


def cmd_plan(args: argparse.Namespace) -> int:
    import yaml

    from orchestrator.deployments import plan_request_from_spec
    from orchestrator.render import print_plan_table
    from orchestrator.spec import load_deployment_file
    from placement.planner import make_plan

    spec = load_deployment_file(args.filename)
    topology = resolve_topology(args)
    request = plan_request_from_spec(spec)
    started = time.perf_counter()
    try:
        plan = make_plan(request, topology)
    except Unplaceable as exc:
        print(f"lpuctl plan: {spec.name} does not fit: {exc}", file=sys.stderr)
        return EXIT_UNPLACEABLE
    plan = plan.with_timing(time.perf_counter() - started)
    if args.svg:
        _write_svg(args.svg, plan, topology)
    if args.output == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    elif args.output == "yaml":
        # libyaml's dumper where PyYAML has it: the pure-Python one is 8x slower on big plans.
        dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
        print(yaml.dump(plan.to_dict(), Dumper=dumper, sort_keys=False), end="")
    else:
        print_plan_table(plan, topology)
    return EXIT_OK


def _write_svg(path: str, plan: object, topology: Topology) -> None:
    from orchestrator.rackmap import render_rack_map

    try:
        Path(path).write_text(render_rack_map(plan, topology), encoding="utf-8")  # type: ignore[arg-type]
    except OSError as exc:
        raise InputError(f"cannot write SVG: {exc.strerror}", source=path) from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["agent"]:  # the agent parses its own flags
            return run_agent(argv[1:])
        args = parser.parse_args(argv)
        code: int = args.handler(args)
        return code
    except CommandError as exc:
        print(f"lpuctl: {exc}", file=sys.stderr)
        return exc.code
    except _UsageError as exc:
        print(str(exc), file=sys.stderr)
        print("run 'lpuctl --help' for usage", file=sys.stderr)
        return EXIT_INVALID
    except (SpecError, InputError) as exc:
        print(f"lpuctl: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`lpuctl plan ... | head`): not an error of ours.
        sys.stderr.close()
        return EXIT_OK
    except Exception as exc:
        if os.environ.get("LPUCTL_DEBUG"):
            raise
        print(
            f"lpuctl: internal error: {type(exc).__name__}: {exc} "
            "(set LPUCTL_DEBUG=1 for the traceback)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


def entrypoint() -> NoReturn:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
