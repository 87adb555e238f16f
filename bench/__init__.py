"""Benchmarks that print figures (not pass/fail tests). Run each as a module from the
repository root, e.g. `python -m bench.shard_load`: the package then imports like any other,
with no `sys.path` patching (as a script, `bench/placement.py` would shadow `placement`)."""
