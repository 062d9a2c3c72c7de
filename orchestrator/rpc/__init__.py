"""The gRPC edge: the only importer of the generated code in ``orchestrator._proto``.

- :mod:`orchestrator.rpc.wire`: protobuf messages to and from the model;
- :mod:`orchestrator.rpc.server`: the ``orchestrator.v1.Orchestrator`` servicer over the
  :class:`~orchestrator.service.Service`, health, reflection, the drain, and the one
  mapping of errors to status codes;
- :mod:`orchestrator.rpc.auth`: the bearer token of every call, and the caller's scope;
- :mod:`orchestrator.rpc.tls`: the daemon's TLS material, checked at start and reread on SIGHUP;
- :mod:`orchestrator.rpc.client`: the synchronous client the CLI uses.
"""
