"""`lpuctl verify NAME`: run the silent-data-corruption canary now (the admin API's Verify).

Prints one line saying what was compared and found, then a row per divergence (replica,
stage, chips, tick, the canary's step, whether the chips were fenced) and any notes (replicas
not compared and why). Exit 0 when every Ready replica's canary matched, 1 otherwise — a
corruption found, an inconclusive run, no Ready replica — and 2 for bad input.
"""

from __future__ import annotations

import argparse

from orchestrator.lpuctl_commands import EXIT_FAILED, EXIT_OK

HEADER = ("REPLICA", "STAGE", "CHIPS", "TICK", "STEP", "WHAT", "FENCED")


def cmd_verify(args: argparse.Namespace) -> int:
    from orchestrator.lpuctl_cluster import _dict, _print_structured, _table, call, connect
    from protos import admin_pb2

    client = connect(args)
    report = call(
        client, "Verify", admin_pb2.VerifyRequest(deployment=args.name), timeout=args.timeout
    )
    if args.output != "table":
        _print_structured([_dict(report)], args.output)
    else:
        print(f"{args.name}: {report.message} ({report.seconds:.2f} s, {report.runs} run(s))")
        if report.divergences:
            _table(
                HEADER,
                [
                    (
                        d.replica,
                        d.stage,
                        ",".join(d.chips),
                        d.tick,
                        d.step,
                        "missing" if d.missing else "different",
                        "yes" if d.fenced else "no",
                    )
                    for d in report.divergences
                ],
            )
        for note in report.notes:
            print(f"note: {note}")
    return EXIT_OK if report.passed else EXIT_FAILED
