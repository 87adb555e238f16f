"""The shard format: the contract between the compiler (`orchestrator`) and the agents.

* `shardformat.codec`: safetensors blobs in memory (headers parsed defensively, tensors as
  zero-copy views);
* `shardformat.layout`: which op pieces and tensor slices a stage and a TP rank hold;
* `shardformat.manifest`: the typed, versioned program manifest a shard carries in its
  `__metadata__`, written by the compiler and parsed (every field checked) by the agent;
* `shardformat.errors`: `ExecutionError`, the one error all of the above raise.

Pure: numpy and the stdlib (plus `placement` for model configs), no gRPC, threads or sockets
(an import-linter contract in pyproject.toml holds it to that).
"""
