"""The control plane's pure core: domain model, node liveness and the reconciler.

Plain code over data (no gRPC, Ray, Kubernetes, SQLite, sockets, threads, clocks or
processes — an import-linter contract enforces it): `reconcile(desired, observed, now)` returns
the actions that move the cluster toward the desired state, and the controller executes them
through its ports. See `model` (the data), `actions` (the decisions), `cluster` (the topology the
planner sees), `reconcile` (the rules) and `canary` (which chip and tick a silent-data-corruption
canary found wrong).
"""

from orchestrator.core.actions import (
    Action,
    BumpEpoch,
    Compile,
    Configure,
    DeleteDeployment,
    ForgetReplica,
    Load,
    MarkNodeNotReady,
    MarkNodeReady,
    Place,
    PlacedReplica,
    RecordEvent,
    RemoveReplica,
    SetCondition,
    SetPhase,
    StartEpoch,
    Unload,
)
from orchestrator.core.cluster import ClusterView, cluster_topology
from orchestrator.core.model import (
    Chip,
    ChipHealth,
    Condition,
    ConditionStatus,
    ConditionType,
    CoreSettings,
    DeploymentStatus,
    DeploymentTarget,
    HeldShard,
    Node,
    NodeState,
    Observed,
    Phase,
    Replica,
    ShardAssignment,
    chip_id,
    node_alive,
    node_name,
    node_state,
)
from orchestrator.core.reconcile import loading_progress, reconcile, replica_plan

__all__ = [
    "Action",
    "BumpEpoch",
    "Chip",
    "ChipHealth",
    "ClusterView",
    "Compile",
    "Condition",
    "ConditionStatus",
    "ConditionType",
    "Configure",
    "CoreSettings",
    "DeleteDeployment",
    "DeploymentStatus",
    "DeploymentTarget",
    "ForgetReplica",
    "HeldShard",
    "Load",
    "MarkNodeNotReady",
    "MarkNodeReady",
    "Node",
    "NodeState",
    "Observed",
    "Phase",
    "Place",
    "PlacedReplica",
    "RecordEvent",
    "RemoveReplica",
    "Replica",
    "SetCondition",
    "SetPhase",
    "ShardAssignment",
    "StartEpoch",
    "Unload",
    "chip_id",
    "cluster_topology",
    "loading_progress",
    "node_alive",
    "node_name",
    "node_state",
    "reconcile",
    "replica_plan",
]
