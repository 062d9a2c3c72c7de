"""Testing event functions: run one exactly as the daemon would, against a stand-in provider, and see what it did.

    from orchestrator.testing import run
    from orchestrator_salesforce.webhooks import register_webhook

    def test_registers_a_webhook() -> None:
        result = run(
            register_webhook,
            connection_config={"instance_url": "acme.my.salesforce.com"},
            provider={"POST /webhooks": (201, {"id": "wh1"})},
        )
        assert result.ok, result
        assert result.metadata == {"webhook_id": "wh1"}
        [request] = result.requests
        assert (request.method, request.path) == ("POST", "/webhooks")

:func:`run` (or ``await`` :func:`arun` in an async test) builds the context
of one attempt (the connection, its config, metadata, the event's payload,
the credentials, the integration's settings and the environment's variables)
and runs the function through the daemon's own dispatcher and runner: the
same timeout (the function's own, or the daemon's default: 60 s, 30 s for
validate and cleanup functions), the same metadata validation and limits,
the same redaction of its error and log lines. It returns a :class:`Result`:
the outcome, the metadata after, the log lines and the requests made.

The provider is a stand-in, one of:

- an ``httpx.MockTransport`` (any ``httpx.AsyncBaseTransport``);
- a dict of canned responses, ``"METHOD /path"`` (relative to the integration's
  base URL, ``*`` wildcards allowed) to an answer: an ``int`` (that status, no
  body), a ``dict`` (200 with it as JSON), a ``str`` (200 with it as text),
  ``None`` (204), a tuple ``(status, body)`` or ``(status, body, headers)``
  (``body`` as above: ``(200, [1, 2])`` for a JSON array), an ``httpx.Response``,
  a function of the :class:`httpx.Request` returning any of these, or a list
  of answers given in turn (the last one repeats);
- a folder (or file) of responses saved by ``orchestrator dryrun
  --save-responses DIR`` (:mod:`orchestrator.responses`): each saved exchange
  answers one request of the same method and path, in order.

A request the stand-in has no answer for raises :class:`UnexpectedRequest` in
the function (so the attempt fails naming it). The pytest plugin (entry point
``pytest11``, loaded when this distribution is installed) offers the same as
the ``run_function`` fixture, and adds each run to a failing test's report.
"""

from orchestrator.testing._run import (
    STAND_IN_BASE_URL,
    Outcome,
    Request,
    Result,
    Runner,
    UnexpectedRequest,
    arun,
    run,
)

for _public in (Outcome, Request, Result, Runner, UnexpectedRequest, arun, run):
    _public.__module__ = __name__  # shown as orchestrator.testing.Result, not as where it is defined

__all__ = ["STAND_IN_BASE_URL", "Outcome", "Request", "Result", "Runner", "UnexpectedRequest", "arun", "run"]
