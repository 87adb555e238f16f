"""Shared fixtures: the session's certificates and agent clusters that reap their processes.

Pure helpers (shards, load streams, polling, threads) and the classes handed out here live in
`tests/agent_helpers.py`; what has a set-up and a teardown is a fixture:

* `session_certs`: one cluster CA and control-plane certificate for the whole session (agents
  started with it issue their own certificates from it); removed with pytest's temp dirs.
* `agent_cluster`: an `AgentCluster` per test module (start agents with `.start(node, ...)`);
  every agent it started is terminated and reaped when the module ends, even on failure.
* `fresh_agent_cluster`: the same, per test.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_helpers import AgentCluster

from security import certs as certs_mod


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
