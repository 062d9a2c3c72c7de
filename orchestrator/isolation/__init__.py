"""Process isolation (``serve --isolation process``): event functions run in a supervised pool of worker processes.

:mod:`.pool` is the daemon's side (:class:`~.pool.ProcessPool`), :mod:`.child`
the worker process, :mod:`._wire` what they say to each other. The pool
plugs into the runner as its ``invoke_with``: the attempt's record, span,
metrics and redaction are made in the daemon exactly as for an attempt run
in the daemon's own threads. ``orchestrator dryrun`` runs in its own process
and does not use the pool.
"""

from orchestrator.isolation.pool import WORKER_DIED, WORKER_ERROR, WORKER_UNAVAILABLE, ProcessPool

__all__ = ["WORKER_DIED", "WORKER_ERROR", "WORKER_UNAVAILABLE", "ProcessPool"]
