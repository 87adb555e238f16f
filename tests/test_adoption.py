"""Adoption after a control-plane restart, without processes.

`orchestrator.adoption.unadoptable` over hand-made agent reports; then the controller restarted
over the same store while the (fake) agents keep what they hold and run: nothing is loaded,
configured or started again when the agents agree with the store; a node whose agent no longer
runs a replica's stage moves that replica, and only it, to a new epoch; a load the dead control
plane left in flight is waited for, asked about again, and then loaded once. The process
runtime's record: garbage, dead and reused pids are never adopted; garbage in `ports.json` is
ignored, and a restarted control plane binds the ports it had, or new ones when one is taken; a
bad `--heartbeat-timeout` is exit 2 naming the flag. The real processes are
`tests/test_control_plane_crash.py`'s.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
import pytest
from agent_helpers import wait_for
from test_controller import PROFILE, SRAM, Clock, FakeAgents, FakeError, _apply, _run

from agents.registration import reconnect_options
from orchestrator.adoption import unadoptable
from orchestrator.control_plane import ControlPlane, StatePaths, prepare_state, previous_ports
from orchestrator.controller import Controller, ShardCompiler
from orchestrator.core import Chip, CoreSettings, Node, Phase, Replica
from orchestrator.process_runtime import (
    ProcessRuntime,
    process_command,
    process_started_at,
    recorded_agents,
)
from orchestrator.runtime import NodeSpec
from orchestrator.store import Store
from placement.plan import OpCut, StagePlan
from protos import agent_pb2

# --- unadoptable -------------------------------------------------------------------------------

NODE = Node("rack-0/node-1", "rack-0", 1, "a:1", "id", (Chip(0, 10), Chip(1, 10)), 0.0)


def _replica(chips: tuple[str, ...], *, epoch: int = 3, running: int | None = 3) -> Replica:
    cut = OpCut(0, "embed", 0, 1)
    stages = tuple(
        StagePlan(0, i, cut, cut, (chip,), 1, 10, 0.0, 0) for i, chip in enumerate(chips)
    )
    return Replica(
        "d", 0, 1, "t", stages, epoch=epoch, configured_epoch=epoch, running_epoch=running
    )


def _status(*pipelines: tuple[int, int, str]) -> agent_pb2.StatusResponse:
    """(chip, epoch, phase) of replica d/0 on each chip listed."""
    chips: dict[int, agent_pb2.ChipStatus] = {}
    for chip, epoch, phase in pipelines:
        chips.setdefault(chip, agent_pb2.ChipStatus(chip=chip)).pipelines.append(
            agent_pb2.PipelineStatus(
                deployment="d", replica=0, stage=chip, epoch=epoch, phase=phase
            )
        )
    return agent_pb2.StatusResponse(chips=list(chips.values()))


CHIPS = ("rack-0/node-1/chip-0", "rack-0/node-1/chip-1", "rack-0/node-2/chip-0")


def test_a_replica_its_agents_run_at_its_epoch_is_adopted() -> None:
    status = _status((0, 3, "running"), (1, 3, "running"))
    assert unadoptable(NODE, status, [_replica(CHIPS)]) == []  # node-2's chip is not asked


@pytest.mark.parametrize(
    ("pipelines", "why"),
    [
        (((0, 3, "running"),), "rack-0/node-1/chip-1 does not run it"),
        (((0, 3, "running"), (1, 2, "running")), "rack-0/node-1/chip-1 runs epoch 2"),
        (((0, 3, "halted"), (1, 3, "running")), "rack-0/node-1/chip-0 is halted"),
        (((0, 3, "barrier"), (1, 3, "running")), "rack-0/node-1/chip-0 is barrier"),
    ],
)
def test_a_replica_its_agents_do_not_run_as_stored_moves_to_a_new_epoch(
    pipelines: tuple[tuple[int, int, str], ...], why: str
) -> None:
    (bump,) = unadoptable(NODE, _status(*pipelines), [_replica(CHIPS)])
    assert (bump.deployment, bump.replica, bump.epoch) == ("d", 0, 4)
    assert why in bump.reason


def test_only_replicas_stored_as_running_are_checked() -> None:
    empty = agent_pb2.StatusResponse()
    configuring = _replica(CHIPS, running=2)  # mid-bring-up: its next step replaces it anyway
    elsewhere = _replica(("rack-1/node-0/chip-0",))
    assert unadoptable(NODE, empty, [configuring, elsewhere]) == []


# --- the controller restarted over the same store ----------------------------------------------


class RunningAgents(FakeAgents):
    """FakeAgents that also report the pipelines they run and loads left in flight."""

    def __init__(self) -> None:
        super().__init__()
        self.pipelines: dict[tuple[str, int], dict[tuple[str, int], tuple[int, int]]] = {}
        self.in_flight: dict[tuple[str, int], str] = {}

    def status(self, address: str, node: str) -> agent_pb2.StatusResponse:
        reply = super().status(address, node)
        for chip in reply.chips:
            for (deployment, replica), (stage, epoch) in self.pipelines.get(
                (node, chip.chip), {}
            ).items():
                chip.pipelines.append(
                    agent_pb2.PipelineStatus(
                        deployment=deployment,
                        replica=replica,
                        stage=stage,
                        epoch=epoch,
                        phase="running",
                    )
                )
            if (node, chip.chip) in self.in_flight:
                chip.loads.append(
                    agent_pb2.LoadProgress(
                        shard_id=self.in_flight[(node, chip.chip)], bytes_loaded=1, bytes_total=9
                    )
                )
        return reply

    def start(
        self,
        requests: Mapping[str, agent_pb2.ConfigureReplicaRequest],
        ready: Sequence[str],
        nodes: Mapping[str, str],
    ) -> None:
        super().start(requests, ready, nodes)
        for address, request in requests.items():
            for assignment in request.assignments:
                for chip in assignment.chips:
                    self.pipelines.setdefault((nodes[address], chip), {})[
                        (request.deployment, request.replica)
                    ] = (assignment.stage, request.epoch)

    def remove_replica(self, address: str, node: str, deployment: str, replica: int) -> None:
        super().remove_replica(address, node, deployment, replica)
        for (name, _), running in self.pipelines.items():
            if name == node:
                running.pop((deployment, replica), None)


def _restarted(tmp_path: Path, agents: FakeAgents, clock: Clock) -> Controller:
    """A new controller on the store of the one that "crashed" (same agents, same shards)."""
    controller = Controller(
        Store(tmp_path / "store.db"),
        agents,
        ShardCompiler(tmp_path / "shards"),
        PROFILE,
        clock=clock,
        settings=CoreSettings(),
    )
    controller.resume()
    return controller


def _ready(tmp_path: Path) -> tuple[RunningAgents, Clock, dict[int, int]]:
    """tiny-llama brought to Ready by a first controller; its replicas' epochs."""
    store = Store(tmp_path / "store.db")
    clock = Clock()
    agents = RunningAgents()
    first = Controller(store, agents, ShardCompiler(tmp_path / "shards"), PROFILE, clock=clock)
    chips = tuple(Chip(i, SRAM) for i in range(PROFILE.chips_per_node))
    store.register_nodes(
        [
            Node(
                f"rack-{r}/node-{s}",
                f"rack-{r}",
                s,
                f"127.0.0.1:{7000 + 10 * r + s}",
                "id",
                chips,
                clock.now,
            )
            for r in range(2)
            for s in range(3)
        ],
        clock.now,
    )
    _apply(store, clock)
    _run(first, clock)
    record = store.deployment("tiny-llama")
    assert record is not None and record.status.phase is Phase.READY
    epochs = {r.index: r.epoch for r in store.replicas("tiny-llama")}
    store.close()
    agents.calls.clear()
    return agents, clock, epochs


def test_a_restarted_controller_adopts_what_the_agents_hold_and_run(tmp_path: Path) -> None:
    agents, clock, epochs = _ready(tmp_path)
    clock.now += 30  # the control plane was down for a while
    controller = _restarted(tmp_path, agents, clock)
    _run(controller, clock)
    assert agents.calls == []  # no load, configure, start or remove
    record = controller.store.deployment("tiny-llama")
    assert record is not None and record.status.phase is Phase.READY
    assert {r.index: r.epoch for r in controller.store.replicas("tiny-llama")} == epochs
    assert not [e for e in controller.store.events() if e.reason == "Resynchronizing"]


def test_a_replica_not_running_as_stored_resynchronizes_alone(tmp_path: Path) -> None:
    agents, clock, epochs = _ready(tmp_path)
    # one chip of replica 1 no longer runs its stage (the old control plane died mid-step)
    key = next(k for k, v in agents.pipelines.items() if ("tiny-llama", 1) in v)
    del agents.pipelines[key][("tiny-llama", 1)]
    controller = _restarted(tmp_path, agents, clock)
    _run(controller, clock)
    assert not [c for c in agents.calls if c[0] == "load"]  # every shard was still held
    steps = [c[:3] for c in agents.calls if c[0] in ("configure", "start")]
    assert steps == [("configure", "tiny-llama", "1"), ("start", "tiny-llama", "1")]
    after = {r.index: r.epoch for r in controller.store.replicas("tiny-llama")}
    assert after == {0: epochs[0], 1: epochs[1] + 1}
    assert agents.started >= {("tiny-llama", 1, epochs[1] + 1)}
    (event,) = [e for e in controller.store.events() if e.reason == "Resynchronizing"]
    assert "does not run it" in event.message


def test_a_load_left_in_flight_is_waited_for_then_loaded_once(tmp_path: Path) -> None:
    agents, clock, _ = _ready(tmp_path)
    node, chip = next(iter(k for k, v in agents.held.items() if v))
    (shard,) = agents.held[(node, chip)]
    del agents.held[(node, chip)]  # the dead control plane's load of it was cut short...
    agents.in_flight[(node, chip)] = shard  # ...and the agent has not noticed yet
    controller = _restarted(tmp_path, agents, clock)
    for _ in range(3):
        controller.run_pass()
        clock.now += 0.1
    assert not [c for c in agents.calls if c[0] == "load"]  # it waits for the load in flight
    del agents.in_flight[(node, chip)]  # the agent aborts it
    _run(controller, clock)
    loads = Counter((c[1], c[2]) for c in agents.calls if c[0] == "load")
    assert loads == {(node, str(chip)): 1}
    record = controller.store.deployment("tiny-llama")
    assert record is not None and record.status.phase is Phase.READY


# --- the process runtime's record --------------------------------------------------------------

SPEC = NodeSpec("rack-0/node-0", "rack-0", 0, 8, "dev")


def test_recorded_agents_of_an_absent_or_garbage_file_are_none(tmp_path: Path) -> None:
    assert recorded_agents(tmp_path / "absent.json") == {}
    (tmp_path / "bad.json").write_text("[1, 2")
    assert recorded_agents(tmp_path / "bad.json") == {}
    (tmp_path / "list.json").write_text("[1, 2]")
    assert recorded_agents(tmp_path / "list.json") == {}


def test_a_dead_a_reused_or_a_foreign_pid_is_never_adopted(tmp_path: Path) -> None:
    runtime = ProcessRuntime(tmp_path, "127.0.0.1:1", tmp_path, state_file=tmp_path / "a.json")
    # a stand-in with an agent's command line: `-c` leaves the rest to sys.argv
    command = [sys.executable, "-c", "import time; time.sleep(60)", "-m", "agents.main"]
    command += ["--node", SPEC.name]
    other = subprocess.Popen(command)
    try:
        wait_for(lambda: process_command(other.pid) == command, what="the child's exec")
        started = process_started_at(other.pid)
        assert started is not None
        record = {"pid": other.pid, "started": started, "address": "127.0.0.1:2"}
        # alive, but not recorded with this command, or not this node's agent: left alone
        assert runtime._adopt(SPEC, {**record, "command": ["something", "else"]}) is None
        other_node = NodeSpec("rack-0/node-1", "rack-0", 1, 8, "dev")
        assert runtime._adopt(other_node, {**record, "command": command}) is None
        assert runtime._adopt(SPEC, {**record, "started": started + 1}) is None  # reused pid
        assert other.poll() is None
        # an agent this state directory started with another command: replaced
        assert runtime._adopt(SPEC, {**record, "command": command}) is None
        wait_for(lambda: other.poll() is not None, timeout=20, what="the outdated process stopped")
    finally:
        other.kill()
        other.wait()
    assert runtime._adopt(SPEC, record) is None  # gone
    assert runtime._adopt(SPEC, {"pid": "1", "started": None}) is None


def test_previous_ports_ignore_garbage(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path)
    assert previous_ports(paths) == {}
    paths.ports.write_text("{not json")
    assert previous_ports(paths) == {}
    paths.ports.write_text('{"admin": 70000, "registry": "1", "metrics": 9100, "other": 5}')
    assert previous_ports(paths) == {"metrics": 9100}


def test_lpuctl_up_refuses_a_bad_heartbeat_timeout() -> None:
    for bad in ("0.5", "-1", "nan", "soon", "7200"):
        run = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "up", "--heartbeat-timeout", bad],
            cwd=Path(__file__).resolve().parent.parent,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 2, (bad, run.stderr)
        assert "--heartbeat-timeout" in run.stderr and "Traceback" not in run.stderr


def test_reconnect_backoff_is_capped_at_two_heartbeat_intervals() -> None:
    options = dict(reconnect_options(0.5))
    assert options["grpc.max_reconnect_backoff_ms"] == 1000
    assert options["grpc.initial_reconnect_backoff_ms"] <= 1000


class Unreachable(FakeError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE


def test_an_agent_that_does_not_answer_at_first_is_asked_again(tmp_path: Path) -> None:
    agents, clock, epochs = _ready(tmp_path)
    node = "rack-1/node-1"
    silent = {"passes": 2}
    answer = agents.status

    def status(address: str, name: str) -> agent_pb2.StatusResponse:
        if name == node and silent["passes"] > 0:
            silent["passes"] -= 1
            raise Unreachable()
        return answer(address, name)

    agents.status = status  # type: ignore[method-assign]
    key = next(k for k, v in agents.pipelines.items() if k[0] == node and v)
    (running,) = agents.pipelines[key]
    del agents.pipelines[key][running]  # what only its own Status can tell
    controller = _restarted(tmp_path, agents, clock)
    for _ in range(3):  # the loop runs a pass every heartbeat interval, with or without work
        controller.run_pass()
        clock.now += 0.1
    _run(controller, clock)
    assert silent["passes"] == 0
    after = {r.index: r.epoch for r in controller.store.replicas("tiny-llama")}
    assert after[running[1]] == epochs[running[1]] + 1  # adopted on the third try, resynced


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_a_restarted_control_plane_binds_its_previous_ports_or_new_ones(tmp_path: Path) -> None:
    paths = prepare_state(tmp_path)
    admin, registry = _free_port(), _free_port()
    paths.ports.write_text(json.dumps({"admin": admin, "registry": registry}))
    plane = ControlPlane(tmp_path)
    try:
        assert (plane.servers.admin_port, plane.servers.registry_port) == (admin, registry)
    finally:
        plane.stop()
    with socket.socket() as taken:  # someone else took the registry port meanwhile
        taken.bind(("127.0.0.1", registry))
        taken.listen()
        plane = ControlPlane(tmp_path)
        try:
            assert plane.servers.registry_port not in (0, registry)
        finally:
            plane.stop()
