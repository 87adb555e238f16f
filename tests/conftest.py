"""Shared fixtures: the session's certificates and agent clusters that reap their processes.

Pure helpers (shards, load streams, polling, threads) and the classes handed out here live in
`tests/agent_helpers.py`; what has a set-up and a teardown is a fixture:

* `session_certs`: one cluster CA and control-plane certificate for the whole session (agents
  started with it issue their own certificates from it); removed with pytest's temp dirs.
* `agent_cluster`: an `AgentCluster` per test module (start agents with `.start(node, ...)`);
  every agent it started is terminated and reaped when the module ends, even on failure.
* `fresh_agent_cluster`: the same, per test.

The session's one embedded Ray is started when collection ends, before the first test, if any
selected test uses the `ray_session` fixture (tests/test_ray_runtime.py): Ray starts its GCS
and raylet with a `preexec_fn`, and a fork taken once gRPC's threads exist (every agent test
makes channels) can hang the child before it execs (`orchestrator.ray_runtime.connect_ray`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import AgentCluster

from security import certs as certs_mod


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Start the session's embedded Ray now, while the process has no gRPC thread yet, when
    a selected test needs it; it is shut down when the session ends."""
    if not any("ray_session" in getattr(item, "fixturenames", ()) for item in items):
        return
    import ray

    from orchestrator.ray_runtime import init_embedded

    if not ray.is_initialized():
        init_embedded()
        config.add_cleanup(ray.shutdown)


@pytest.fixture(scope="session")
def session_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's certificate directory: cluster CA and control-plane certificate."""
    path = tmp_path_factory.mktemp("certs")
    certs_mod.init_cluster(path)
    return path


@pytest.fixture(scope="module")
def agent_cluster(session_certs: Path) -> Iterator[AgentCluster]:
    """Agent processes shared by one test module, all reaped at its end."""
    cluster = AgentCluster(session_certs)
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def fresh_agent_cluster(session_certs: Path) -> Iterator[AgentCluster]:
    """Agent processes of one test, all reaped at its end."""
    cluster = AgentCluster(session_certs)
    try:
        yield cluster
    finally:
        cluster.close()
