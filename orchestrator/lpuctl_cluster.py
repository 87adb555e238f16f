"""`lpuctl` commands that talk to a control plane: up, down, apply, get, describe, delete,
generate, cordon, uncordon, drain, events.

Where the control plane is: `--server HOST:PORT` (or `LOCKSTEP_SERVER`), trusted through the
cluster CA certificate `--ca FILE` (or `LOCKSTEP_CA`), with `--token` (or `LOCKSTEP_TOKEN`).
Each unset one comes from the config file (`LOCKSTEP_CONFIG`, default
`~/.config/lockstep/config.yaml`: keys `server`, `token`, `ca`, `stateDir`), then from the
embedded control plane's state directory (`--state-dir`, or `LOCKSTEP_HOME`, default
`~/.lockstep/embedded`) that `lpuctl up` made: its endpoint.json, certs/ca.crt and its admin
token. Flags win over the environment, the environment over the file.

Exit codes: 0 done; 1 could not be done (no control plane, not found, refused, not ready —
the message says why); 2 invalid input (a bad file or flag: INVALID_ARGUMENT).

Output formats (`-o`): the default table (kubectl-like columns, stable order), `wide` (more
columns), `json` and `yaml` (the API's messages with their proto field names — stable, as the
proto is).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf.json_format import MessageToDict

from orchestrator.lpuctl_commands import (
    DEFAULT_STATE,
    EXIT_INVALID,
    EXIT_OK,
    CommandError,
)
from orchestrator.safe_yaml import SpecError
from orchestrator.state_files import ENDPOINT_FILE, StatePaths, token_for
from protos import admin_pb2, admin_pb2_grpc
from security.identity import CONTROL_PLANE, dns_name

MAX_FILE_BYTES = 1 << 20


CONFIG_KEYS = ("server", "token", "ca", "stateDir")


def load_config() -> dict[str, str]:
    """The lpuctl config file's settings (absent file: none). Bad content is exit 2."""
    raw = os.environ.get("LOCKSTEP_CONFIG") or "~/.config/lockstep/config.yaml"
    path = Path(os.path.expanduser(raw))
    try:
        if not path.exists():
            return {}
        if path.stat().st_size > 64 << 10:
            raise CommandError(f"config file {path} is larger than 64 KiB", EXIT_INVALID)
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CommandError(f"cannot read config file {path}: {exc}", EXIT_INVALID) from None
    if not isinstance(data, dict) or not all(
        k in CONFIG_KEYS and isinstance(v, str) for k, v in data.items()
    ):
        raise CommandError(
            f"config file {path}: expected a mapping of {', '.join(CONFIG_KEYS)} to strings",
            EXIT_INVALID,
        )
    return {str(k): str(v) for k, v in data.items()}


def state_dir(args: argparse.Namespace) -> Path:
    raw = (
        args.state_dir
        or os.environ.get("LOCKSTEP_HOME")
        or load_config().get("stateDir")
        or DEFAULT_STATE
    )
    return Path(os.path.expanduser(raw))


# --- the client ------------------------------------------------------------------------------


@dataclass
class Client:
    stub: admin_pb2_grpc.AdminStub
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...]
    server: str


def connect(args: argparse.Namespace) -> Client:
    paths = StatePaths(state_dir(args))
    config = load_config()
    server = args.server or os.environ.get("LOCKSTEP_SERVER") or config.get("server")
    if not server:
        try:
            server = json.loads(paths.endpoint.read_text())["admin"]
        except (OSError, ValueError, KeyError):
            raise CommandError(
                f"no control plane: give --server (or LOCKSTEP_SERVER), or start one with "
                f"'lpuctl up' (looked for {paths.endpoint})"
            ) from None
    ca_path = (
        args.ca or os.environ.get("LOCKSTEP_CA") or config.get("ca") or str(paths.certs / "ca.crt")
    )
    try:
        ca = Path(ca_path).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read the cluster CA {ca_path}: {exc.strerror}") from None
    token = args.token or os.environ.get("LOCKSTEP_TOKEN") or config.get("token")
    if not token and paths.tokens.exists():
        token = token_for(paths, "admin")
    channel = grpc.secure_channel(
        server,
        grpc.ssl_channel_credentials(root_certificates=ca),
        options=[("grpc.ssl_target_name_override", dns_name(CONTROL_PLANE))],
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return Client(admin_pb2_grpc.AdminStub(channel), channel, metadata, server)


def _rpc_error(exc: grpc.RpcError, server: str) -> CommandError:
    code = exc.code()
    details = exc.details() or code.name
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return CommandError(details, EXIT_INVALID)
    if code is grpc.StatusCode.UNAVAILABLE and "connect" in details.lower():
        return CommandError(f"cannot reach the control plane at {server}: {details}")
    return CommandError(f"{code.name}: {details}")


def call(client: Client, method: str, request: Any, timeout: float = 30.0) -> Any:
    try:
        return getattr(client.stub, method)(request, metadata=client.metadata, timeout=timeout)
    except grpc.RpcError as exc:
        raise _rpc_error(exc, client.server) from None


# --- output ----------------------------------------------------------------------------------


def _dict(message: Any) -> dict[str, Any]:
    out: dict[str, Any] = MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return out


def _print_structured(items: list[dict[str, Any]], output: str) -> None:
    if output == "json":
        print(json.dumps(items if len(items) != 1 else items[0], indent=2, sort_keys=True))
    else:
        print(yaml.safe_dump(items if len(items) != 1 else items[0], sort_keys=True), end="")


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    cells = [list(header)] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.2f}Mi"


# --- commands --------------------------------------------------------------------------------


def _files(target: str) -> list[Path]:
    path = Path(target)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml"))
        if not found:
            raise CommandError(f"{target}: no .yaml or .yml file in this directory", EXIT_INVALID)
        return found
    return [path]


def cmd_apply(args: argparse.Namespace) -> int:
    client = connect(args)
    for path in _files(args.filename):
        try:
            if path.stat().st_size > MAX_FILE_BYTES:
                raise CommandError(f"{path}: larger than 1 MiB", EXIT_INVALID)
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CommandError(f"cannot read {path}: {exc.strerror}", EXIT_INVALID) from None
        except UnicodeDecodeError:
            raise CommandError(f"{path}: not UTF-8 text", EXIT_INVALID) from None
        reply = call(client, "Apply", admin_pb2.ApplyRequest(yaml=text, source=str(path)))
        what = "created" if reply.created else "configured" if reply.changed else "unchanged"
        print(f"lpudeployment/{reply.name} {what} (generation {reply.generation})")
        if args.wait:
            wait_ready(client, reply.name, args.timeout)
    return EXIT_OK


def wait_ready(client: Client, name: str, timeout: float) -> None:
    """Poll until the deployment is Ready, showing its phase and loading progress: a `rich`
    progress bar (bytes loaded of all the shards) on a terminal, one line per change else
    (logs and pipes get stable, greppable lines)."""
    if sys.stdout.isatty():
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn())
        with Progress(*columns, transient=False) as progress:
            task = progress.add_task(name, total=None)

            def show(d: admin_pb2.Deployment) -> None:
                progress.update(
                    task,
                    description=f"{name}: {d.phase} {d.ready_replicas}/{d.replicas} ready",
                    completed=d.bytes_loaded,
                    total=d.bytes_total or None,
                )

            _poll_ready(client, name, timeout, show)
        return
    last: list[str] = []

    def line(d: admin_pb2.Deployment) -> None:
        text = f"{name}: {d.phase} {d.ready_replicas}/{d.replicas} ready"
        if d.bytes_total:
            pct = 100 * d.bytes_loaded / d.bytes_total
            text += f", loaded {_mib(d.bytes_loaded)} of {_mib(d.bytes_total)} ({pct:.0f}%)"
        if text not in last[-1:]:
            print(text, flush=True)
            last.append(text)

    _poll_ready(client, name, timeout, line)


def _poll_ready(
    client: Client, name: str, timeout: float, show: Callable[[admin_pb2.Deployment], None]
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        d = call(client, "Get", admin_pb2.GetRequest(name=name))
        show(d)
        if d.phase == "Ready":
            return
        if d.phase == "Failed":
            raise CommandError(f"{name} failed: {d.reason}: {d.message}")
        if time.monotonic() > deadline:
            raise CommandError(f"{name} is not Ready after {timeout:g} s: {d.phase}: {d.message}")
        time.sleep(0.2)


def cmd_get(args: argparse.Namespace) -> int:
    client = connect(args)
    kind = args.kind.rstrip("s")
    now = time.time()
    if kind in ("deployment", "lpud", "lpudeployment"):
        if args.name:
            items = [call(client, "Get", admin_pb2.GetRequest(name=args.name))]
        else:
            items = list(call(client, "List", admin_pb2.ListRequest()).deployments)
        if args.output in ("json", "yaml"):
            _print_structured([_dict(d) for d in items], args.output)
            return EXIT_OK
        header = ["NAME", "PHASE", "READY", "GENERATION", "AGE"]
        if args.output == "wide":
            header += ["CHIPS", "REASON", "MESSAGE"]
        rows = []
        for d in items:
            row: list[object] = [
                d.name,
                d.phase,
                f"{d.ready_replicas}/{d.replicas}",
                d.generation,
                _age(now - d.created),
            ]
            if args.output == "wide":
                row += [sum(len(r.chips) for r in d.replica_info), d.reason, d.message]
            rows.append(row)
        _table(header, rows)
    elif kind == "node":
        nodes = list(call(client, "ListNodes", admin_pb2.ListNodesRequest()).nodes)
        if args.name:
            nodes = [n for n in nodes if n.name == args.name]
            if not nodes:
                raise CommandError(f"no node named {args.name!r}")
        if args.output in ("json", "yaml"):
            _print_structured([_dict(n) for n in nodes], args.output)
            return EXIT_OK
        header = ["NAME", "STATE", "RACK", "SLOT", "CHIPS", "SRAM USED", "HEARTBEAT"]
        if args.output == "wide":
            header += ["ADDRESS", "IDENTITY"]
        rows = []
        for n in nodes:
            used = sum(c.sram_used_bytes for c in n.chips)
            total = sum(c.sram_bytes for c in n.chips)
            row = [
                n.name,
                n.state,
                n.rack,
                n.slot,
                len(n.chips),
                f"{_mib(used)}/{_mib(total)}",
                f"{n.heartbeat_age_seconds:.1f}s ago",
            ]
            if args.output == "wide":
                row += [n.address, n.identity]
            rows.append(row)
        _table(header, rows)
    elif kind == "chip":
        request = admin_pb2.ListChipsRequest(node=args.name or "")
        chips = list(call(client, "ListChips", request).chips)
        if args.output in ("json", "yaml"):
            _print_structured([_dict(c) for c in chips], args.output)
            return EXIT_OK
        header = ["ID", "HEALTH", "SRAM USED", "SHARDS"]
        if args.output == "wide":
            header += ["SHARD IDS", "REASON"]
        rows = []
        for c in chips:
            row = [c.id, c.health, f"{_mib(c.sram_used_bytes)}/{_mib(c.sram_bytes)}", len(c.shards)]
            if args.output == "wide":
                row += [",".join(s[:12] for s in c.shards), c.reason]
            rows.append(row)
        _table(header, rows)
    else:
        raise CommandError(f"unknown kind {args.kind!r}: deployments, nodes or chips", EXIT_INVALID)
    return EXIT_OK


def cmd_describe(args: argparse.Namespace) -> int:
    client = connect(args)
    if args.kind.rstrip("s") not in ("deployment", "lpud", "lpudeployment"):
        raise CommandError(f"describe: unknown kind {args.kind!r} (deployment)", EXIT_INVALID)
    d = call(client, "Get", admin_pb2.GetRequest(name=args.name))
    events = call(client, "Events", admin_pb2.EventsRequest(deployment=args.name)).events
    manifest = json.loads(d.manifest_json)
    print(f"Name:         {d.name}")
    print(f"Generation:   {d.generation} (observed {d.observed_generation})")
    print(f"Phase:        {d.phase}" + (f" ({d.reason}: {d.message})" if d.reason else ""))
    print(f"Replicas:     {d.ready_replicas}/{d.replicas} ready")
    if d.bytes_total:
        print(f"Loaded:       {_mib(d.bytes_loaded)} of {_mib(d.bytes_total)}")
    print("Spec:")
    for line in yaml.safe_dump(manifest.get("spec", {}), sort_keys=False).splitlines():
        print(f"  {line}")
    if d.plan_json:
        plan = json.loads(d.plan_json)
        print("Plan:")
        print(
            f"  {plan.get('replicas')} replica(s) x {plan.get('pipelineStages')} stage(s) x "
            f"tensorParallel {plan.get('tensorParallel')} = {plan.get('chipsUsed')} chips, "
            f"precision {plan.get('precision')}, profile {plan.get('profile')}"
        )
        predicted = plan.get("predicted") or {}
        if predicted:
            print(f"  predicted: {json.dumps(predicted, sort_keys=True)}")
    print("Replicas:")
    _table(
        [
            "  INDEX",
            "GENERATION",
            "EPOCH",
            "RUNNING",
            "STAGES",
            "CHIPS",
            "RESTARTS",
            "FAILURES",
            "LAST ERROR",
        ],
        [
            [
                f"  {r.index}",
                r.generation,
                r.epoch,
                r.running,
                r.stages,
                len(r.chips),
                r.restarts,
                r.failures,
                r.last_error[:60],
            ]
            for r in d.replica_info
        ],
    )
    print("Conditions:")
    _table(
        ["  TYPE", "STATUS", "REASON", "MESSAGE"],
        [[f"  {c.type}", c.status, c.reason, c.message] for c in d.conditions],
    )
    print("Events:")
    _table(
        ["  AGE", "TYPE", "REASON", "MESSAGE"],
        [[f"  {_age(time.time() - e.time)}", e.kind, e.reason, e.message] for e in events],
    )
    return EXIT_OK


def cmd_delete(args: argparse.Namespace) -> int:
    client = connect(args)
    names = list(args.names)
    if names and names[0].rstrip("s") in ("deployment", "lpud", "lpudeployment"):
        names = names[1:]
    if args.filename:
        from orchestrator.spec import load_deployment_file

        names += [load_deployment_file(str(p)).name for p in _files(args.filename)]
    if not names:
        raise CommandError("delete: name a deployment (or -f FILE)", EXIT_INVALID)
    for name in names:
        call(client, "Delete", admin_pb2.DeleteRequest(name=name))
        print(f"lpudeployment/{name} deleted")
        if args.wait:
            deadline = time.monotonic() + args.timeout
            while True:
                try:
                    client.stub.Get(
                        admin_pb2.GetRequest(name=name), metadata=client.metadata, timeout=10
                    )
                except grpc.RpcError as exc:
                    if exc.code() is grpc.StatusCode.NOT_FOUND:
                        break
                    raise _rpc_error(exc, client.server) from None
                if time.monotonic() > deadline:
                    raise CommandError(f"{name} still exists after {args.timeout:g} s")
                time.sleep(0.2)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    client = connect(args)
    if (args.prompt is None) == (args.ids is None):
        raise CommandError("generate: give a prompt text or --ids, not both", EXIT_INVALID)
    request = admin_pb2.GenerateRequest(
        deployment=args.name,
        prompt_text=args.prompt or "",
        prompt_ids=args.ids or [],
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        seed=args.seed,
    )
    tokens: list[int] = []
    try:
        stream: Iterator[admin_pb2.GenerateResponse] = client.stub.Generate(
            request, metadata=client.metadata, timeout=args.timeout
        )
        for reply in stream:
            tokens.append(reply.token)
            if args.ids is not None or args.show_ids:
                print(reply.token, end=" ", flush=True)
            else:
                print(reply.text, end="", flush=True)
    except grpc.RpcError as exc:
        if tokens:
            print()
        raise _rpc_error(exc, client.server) from None
    print()
    return EXIT_OK


def cmd_node(args: argparse.Namespace) -> int:
    """cordon, uncordon, drain: `args.method` is the RPC."""
    client = connect(args)
    node = call(client, args.method, admin_pb2.NodeRequest(name=args.node))
    if args.method != "Drain" or not args.timeout:
        print(f"node/{node.name}: {args.method.lower()} done ({node.state})")
        return EXIT_OK
    # Drain: the stages there load onto spares, switch over, then unload; wait for it.
    deadline = time.monotonic() + args.timeout
    while True:
        busy = sorted({c.deployment for c in node.chips if c.deployment or c.shards} - {""})
        held = sum(1 for c in node.chips if c.shards)
        if not held and not busy:
            print(f"node/{node.name}: drained ({node.state}; uncordon to use it again)")
            return EXIT_OK
        if time.monotonic() > deadline:
            raise CommandError(
                f"node/{node.name} not drained after {args.timeout:g}s: {held} chip(s) still "
                f"hold shards ({', '.join(busy) or 'unclaimed'}); see lpuctl describe "
                "deployment NAME (no spare to move to?)"
            )
        time.sleep(0.2)
        node = call(client, "GetNode", admin_pb2.GetNodeRequest(name=args.node))


def cmd_events(args: argparse.Namespace) -> int:
    client = connect(args)

    def show(e: Any) -> None:
        when = time.strftime("%H:%M:%S", time.localtime(e.time))
        print(f"{when}  {e.kind:<8} {e.reason:<16} {e.deployment or e.node}: {e.message}")

    if not args.watch:
        request = admin_pb2.EventsRequest(deployment=args.deployment or "")
        for e in call(client, "Events", request).events:
            show(e)
        return EXIT_OK
    try:
        for e in client.stub.Watch(
            admin_pb2.WatchRequest(deployment=args.deployment or ""), metadata=client.metadata
        ):
            show(e)
    except grpc.RpcError as exc:
        raise _rpc_error(exc, client.server) from None
    return EXIT_OK


# --- up and down -----------------------------------------------------------------------------


def cmd_up(args: argparse.Namespace) -> int:
    from orchestrator.control_plane import prepare_state  # only here: a heavy import

    root = state_dir(args)
    paths = prepare_state(root)
    if paths.endpoint.exists():
        try:
            pid = int(json.loads(paths.endpoint.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            pid = 0
        if pid > 0 and _alive(pid):  # a killed one may linger as a zombie nobody reaps
            raise CommandError(f"a control plane already runs for {root} (pid {pid}); lpuctl down")
        paths.endpoint.unlink(missing_ok=True)  # left by a control plane that died
    if args.ray_address is not None:
        args.runtime = "ray"
    log = open(paths.logs / "control-plane.log", "ab")  # noqa: SIM115 - handed to the child
    command = [
        sys.executable,
        "-m",
        "orchestrator.control_plane",
        "--state",
        str(root),
        "--profile",
        args.profile,
        "--racks",
        str(args.racks),
        "--nodes-per-rack",
        str(args.nodes_per_rack),
        "--runtime",
        args.runtime,
        *(["--ray-address", args.ray_address] if args.ray_address else []),
        "--listen",
        args.listen,
        *(["--advertise", args.advertise] if args.advertise else []),
        *(["--allow-fault-injection"] if args.allow_fault_injection else []),
        *(
            ["--heartbeat-timeout", str(args.heartbeat_timeout)]
            if args.heartbeat_timeout is not None
            else []
        ),
    ]
    with log:
        proc = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
        )
    (root / "control-plane.pid").write_text(str(proc.pid))
    nodes = args.racks * args.nodes_per_rack
    if args.ray_address:
        print(
            f"starting the control plane and one node agent per LPU host of the Ray cluster "
            f"at {args.ray_address} (profile {args.profile})",
            flush=True,
        )
    else:
        print(
            f"starting the control plane and {nodes} node agents ({args.racks} rack(s) x "
            f"{args.nodes_per_rack} node(s), profile {args.profile}, runtime {args.runtime})",
            flush=True,
        )
    deadline = time.monotonic() + args.timeout
    while not paths.endpoint.exists():
        if proc.poll() is not None:
            log_path = paths.logs / "control-plane.log"
            lines = [x for x in log_path.read_text(errors="replace").splitlines() if x.strip()]
            raise CommandError(
                f"the control plane exited with {proc.returncode}: "
                f"{lines[-1] if lines else '(no output)'} (log: {log_path})"
            )
        if time.monotonic() > deadline:
            _terminate(proc.pid)
            raise CommandError(f"the control plane did not start within {args.timeout:g} s")
        time.sleep(0.1)
    nodes = int(json.loads(paths.endpoint.read_text()).get("nodes", nodes))
    client = connect(args)
    while True:
        registered = call(client, "ListNodes", admin_pb2.ListNodesRequest()).nodes
        ready = [n for n in registered if n.state == "Ready"]
        if len(ready) >= nodes:
            break
        if time.monotonic() > deadline:
            raise CommandError(f"only {len(ready)} of {nodes} nodes registered in time")
        time.sleep(0.1)
    endpoint = json.loads(paths.endpoint.read_text())
    adopted = len(endpoint.get("adopted", []))
    print(
        f"control plane ready at {endpoint['admin']} (state in {root}); {nodes} nodes Ready"
        + (f" ({adopted} running agent(s) adopted)" if adopted else "")
    )
    return EXIT_OK


# The control plane's own graceful stop can take up to ~35 s (the supervisor thread, then every
# agent stopped with a grace period and, under Ray, the actors' processes awaited before
# ray.shutdown): `down` waits that long before it kills it, and then takes down whatever of its
# process tree is still there, so neither a slow stop nor a kill leaves Ray or agents behind.
STOP_TIMEOUT = 60.0


def _descendants(root: int) -> dict[int, int]:
    """Every process below `root` (by parent pid, from /proc), with its start time so that a
    reused pid is never signalled later."""
    from orchestrator.process_runtime import process_started_at

    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        started = process_started_at(pid)
        if started is not None:
            found[pid] = started
            todo.extend(children.get(pid, []))
    return found


def _terminate(pid: int, timeout: float = 20.0) -> bool:
    """SIGTERM `pid` and wait for it to go; SIGKILL after `timeout`. False if not running."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    return True


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # our child when started in this process
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie of another parent counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True


def _is_agent(pid: int) -> bool:
    """Whether `pid` still runs a node agent (and is not a reused pid)."""
    try:
        return b"agents.main" in Path(f"/proc/{pid}/cmdline").read_bytes() and _alive(pid)
    except OSError:
        return False


def cmd_down(args: argparse.Namespace) -> int:
    from orchestrator.process_runtime import process_started_at, recorded_agents

    root = state_dir(args)
    pid_file = root / "control-plane.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        print(f"no control plane runs for {root}")
        return EXIT_OK
    try:
        agents = [int(a) for a in json.loads((root / ENDPOINT_FILE).read_text())["agent_pids"]]
    except (OSError, ValueError, KeyError, TypeError):
        agents = []
    # The process runtime's record: also the agents it restarted or adopted after endpoint.json
    # was written, and those of a control plane killed before this one (adopted, not children).
    recorded = {
        r["pid"]: r["started"]
        for r in recorded_agents(StatePaths(root).agents).values()
        if isinstance(r.get("pid"), int)
        and isinstance(r.get("started"), int)
        and _is_agent(r["pid"])
    }
    below = _descendants(pid)  # agents, and Ray's processes under the Ray runtime
    stopped = _terminate(pid, timeout=STOP_TIMEOUT)
    for agent in agents:  # the control plane reaps them; these are left only if it was killed
        if _is_agent(agent):
            _terminate(agent)
    for child, started in {**recorded, **below}.items():  # stragglers, by pid and start time
        if process_started_at(child) == started:
            _terminate(child, timeout=5.0)
    pid_file.unlink(missing_ok=True)
    (root / ENDPOINT_FILE).unlink(missing_ok=True)
    StatePaths(root).agents.unlink(missing_ok=True)
    print("control plane and agents stopped" if stopped else f"no control plane runs for {root}")
    return EXIT_OK


__all__ = ["CommandError", "SpecError"]
