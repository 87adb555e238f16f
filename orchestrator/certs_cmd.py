"""`lpuctl certs`: make the cluster CA and issue certificates (see `security.certs`).

    lpuctl certs init DIR                      the CA and the control plane's certificate
    lpuctl certs issue DIR --node NAME         a node agent's certificate
    lpuctl certs issue DIR --control-plane     the control plane's certificate
    ... --rotate                               issue anew even if the current one is good

Both are idempotent: what exists and is still good is kept (and reported as kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from security.identity import CONTROL_PLANE, agent_identity

EXIT_OK, EXIT_INVALID = 0, 2


def register_certs_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add `certs init` and `certs issue` to an argparse subparsers object."""
    certs: argparse.ArgumentParser = subparsers.add_parser(
        "certs",
        help="create the cluster CA and issue certificates for the control plane and agents",
        description="Certificates for mutual TLS between the control plane and the agents.",
    )
    sub = certs.add_subparsers(dest="certs_command", required=True)
    init = sub.add_parser("init", help="create the CA and the control-plane certificate")
    init.add_argument("directory", metavar="DIR")
    init.set_defaults(handler=cmd_certs_init)
    iss = sub.add_parser("issue", help="issue a node agent's (or the control plane's) certificate")
    iss.add_argument("directory", metavar="DIR")
    who = iss.add_mutually_exclusive_group(required=True)
    who.add_argument("--node", help="node name of the agent")
    who.add_argument("--control-plane", action="store_true", help="the control plane")
    iss.add_argument("--rotate", action="store_true", help="replace a still-valid certificate")
    iss.add_argument(
        "--host",
        action="append",
        default=[],
        help="extra DNS name or IP address for the certificate (repeatable)",
    )
    iss.set_defaults(handler=cmd_certs_issue)
    return certs


def _report(made: bool, what: str, path: object) -> None:
    print(f"{'created' if made else 'kept existing'} {what}: {path}")


def cmd_certs_init(args: argparse.Namespace) -> int:
    from security.certs import CertError, init_ca, issue, paths_for  # cryptography: only here

    try:
        _report(init_ca(args.directory), "cluster CA", f"{args.directory}/ca.crt")
        made = issue(args.directory, CONTROL_PLANE)
    except (CertError, OSError) as exc:
        print(f"lpuctl certs init: {exc}", file=sys.stderr)
        return EXIT_INVALID
    _report(made, "control-plane certificate", paths_for(Path(args.directory), CONTROL_PLANE)[0])
    return EXIT_OK


def cmd_certs_issue(args: argparse.Namespace) -> int:
    from security.certs import CertError, issue, paths_for

    try:
        identity = CONTROL_PLANE if args.control_plane else agent_identity(args.node)
        made = issue(args.directory, identity, hosts=args.host, rotate=args.rotate)
    except (CertError, ValueError, OSError) as exc:
        print(f"lpuctl certs issue: {exc}", file=sys.stderr)
        return EXIT_INVALID
    _report(made, f"certificate for {identity}", paths_for(Path(args.directory), identity)[0])
    return EXIT_OK
