"""Benchmarks of the orchestrator, each reported as a ratio to a baseline measured in the same run.

Run ``python bench/run.py [--quick]``; see ``bench/README.md``. Modules:
:mod:`bench._harness` (closed-loop load, child processes, daemons),
:mod:`bench.rpc` (gRPC echo vs EmitLifecycleEvent), :mod:`bench.append`
(plain SQLite commits vs the group-commit store), :mod:`bench.fold` (reading
rows vs ``orchestrator.replay``) and :mod:`bench.startup` (time to SERVING).
"""
