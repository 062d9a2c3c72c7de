"""``orchestrator.testing``: a function run as the daemon runs it, against each kind of stand-in provider."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from pydantic import BaseModel

from orchestrator import Context, Rejected, on_event, responses
from orchestrator.errors import InvalidArgument
from orchestrator.testing import STAND_IN_BASE_URL, Outcome, Runner, UnexpectedRequest, arun, run

pytest_plugins = ["pytester"]


class Webhook(BaseModel):
    """A model with a required field."""

    webhook_id: str


@on_event("post-connection-creation", integration="kit-test", metadata=Webhook)
async def registers(ctx: Context) -> None:
    """POSTs a webhook and keeps its id; logs what it sees of its integration and environment."""
    response = await ctx.post("/webhooks", json={"connection": ctx.connection.connection_id})
    await ctx.set_metadata(Webhook(webhook_id=response.json()["id"]))
    ctx.log("integration", ctx.integration.base_url, dict(ctx.integration.settings), "env", dict(ctx.env))


@on_event("validate-connection", integration="kit-test")
async def checks(ctx: Context) -> None:
    """GETs /me twice and rejects a login other than acme."""
    first = await ctx.get("/me")
    second = await ctx.get("/me")
    ctx.log("logins", first.json()["login"], second.json()["login"])
    if second.json()["login"] != "acme":
        raise Rejected(f"{second.json()['login']} is not acme")


@on_event("pre-connection-deletion", integration="kit-test")
async def hangs(ctx: Context) -> None:
    """Never ends."""
    await anyio.sleep_forever()


def test_canned_answers_of_each_form() -> None:
    """A tuple answers with its status, body and headers; the function's writes and logs come back with the
    metadata after; the request is recorded relative to the base URL, with the stand-in credentials."""
    result = run(registers, provider={"POST /webhooks": (201, {"id": "wh1"}, {"X-Request-Id": "r1"})})
    assert result.ok, result
    assert result.outcome is Outcome.SUCCEEDED
    assert result.metadata == {"webhook_id": "wh1"}
    assert result.writes == [{"function": "registers", "metadata": {"webhook_id": "wh1"}, "merge": False}]
    assert result.logs == [f"info: integration {STAND_IN_BASE_URL} {{}} env {{}}"]
    [request] = result.requests
    assert (request.method, request.path, request.url, request.status) == (
        "POST",
        "/webhooks",
        f"{STAND_IN_BASE_URL}/webhooks",
        201,
    )
    assert request.json() == {"connection": "test-connection"}
    assert "authorization" not in request.headers, "the integration's auth is none: no credential is sent"


@pytest.mark.parametrize(
    ("answer", "status", "body"),
    [
        (204, 204, b""),
        ({"login": "acme"}, 200, b'{"login":"acme"}'),
        ("plain", 200, b"plain"),
        (None, 204, b""),
        ((202, [1, 2]), 202, b"[1,2]"),
        (httpx.Response(201, json={"a": 1}), 201, b'{"a":1}'),
        (lambda request: httpx.Response(200, text=request.url.path), 200, b"/me"),
    ],
)
def test_each_form_of_canned_answer(answer: Any, status: int, body: bytes) -> None:
    """Each documented form of answer is sent as that status and body."""
    seen: list[httpx.Response] = []

    async def calls(ctx: Context) -> None:
        seen.append(await ctx.get("/me"))

    result = run(on_event("validate-connection", integration="kit-test")(calls), provider={"GET /me": answer})
    assert result.outcome in (Outcome.SUCCEEDED, Outcome.FAILED)
    assert [(r.status_code, r.content) for r in seen] == [(status, body)]


def test_a_list_answers_in_turn_and_its_last_repeats() -> None:
    """[first, second]: the first GET gets the first answer, the second and any after get the second."""
    result = run(checks, provider={"GET /m*": [{"login": "globex"}, {"login": "acme"}]})
    assert result.ok, result
    assert result.logs == ["info: logins globex acme"]
    rejected = run(checks, provider={"GET /me": [{"login": "acme"}, {"login": "globex"}]})
    assert (rejected.outcome, rejected.error, rejected.retryable) == (Outcome.REJECTED, "globex is not acme", False)


def test_a_request_without_an_answer_fails_the_attempt_naming_it() -> None:
    """A request the canned answers do not cover raises UnexpectedRequest in the function: the outcome names it."""
    result = run(registers, provider={"GET /me": 200})
    assert (result.outcome, result.error_type) == (Outcome.FAILED, UnexpectedRequest.__name__)
    assert result.error == "no canned response for POST /webhooks (canned: 'GET /me')"
    assert [str(request) for request in result.requests] == ["POST /webhooks -> (no answer)"]
    nothing = run(registers)
    assert nothing.error.startswith("POST /webhooks: no provider was given")


@pytest.mark.parametrize(
    ("provider", "says"),
    [
        ({"/webhooks": 201}, "canned response '/webhooks': the key is METHOD /path, like 'GET /user'"),
        ({"POST /webhooks": []}, "canned response 'POST /webhooks': an empty list of answers"),
        (42, "provider= is a int: give an httpx.MockTransport, a dict of canned responses or the folder"),
    ],
)
def test_a_bad_provider_is_refused_in_one_line(provider: Any, says: str) -> None:
    """A malformed stand-in is an InvalidArgument before anything runs."""
    with pytest.raises(InvalidArgument) as caught:
        run(registers, provider=provider)
    assert str(caught.value).startswith(says)


def test_a_bad_canned_answer_fails_the_attempt_naming_it() -> None:
    """An answer of a type that is no answer: the attempt fails, naming the key and the forms there are."""
    result = run(registers, provider={"POST /webhooks": 1.5})
    assert (result.outcome, result.error_type) == (Outcome.FAILED, "InvalidArgument")
    assert result.error.startswith("canned response 'POST /webhooks': float is not an answer (an int, dict")


def test_a_mock_transport_is_the_provider() -> None:
    """An httpx.MockTransport answers the function's requests, which are recorded too."""
    transport = httpx.MockTransport(lambda request: httpx.Response(201, json={"id": request.headers["x-n"]}))

    async def posts(ctx: Context) -> None:
        response = await ctx.post("/webhooks", headers={"x-n": "7"})
        await ctx.update_metadata({"webhook_id": response.json()["id"]})

    result = run(on_event("post-connection-creation", integration="kit-test")(posts), provider=transport)
    assert result.ok, result
    assert result.metadata == {"webhook_id": "7"}
    assert [r.status for r in result.requests] == [201]


def test_saved_responses_are_replayed_in_order_by_method_and_path(tmp_path: Path) -> None:
    """A file of saved exchanges answers each request with the first unused exchange of its method and path;
    one more GET than was saved is unexpected, naming what is left."""
    exchanges = [
        responses.Exchange("GET", "/me", 200, (("content-type", "application/json"),), b'{"login": "globex"}'),
        responses.Exchange("POST", "/other", 201),
        responses.Exchange("GET", "/me", 200, (("content-type", "application/json"),), b'{"login": "acme"}'),
    ]
    saved = responses.save(
        responses.file_for(tmp_path, "checks"),
        function="checks",
        integration="kit-test",
        base_url="",
        exchanges=exchanges,
    )
    result = run(checks, provider=tmp_path)
    assert result.ok, result
    assert result.logs == ["info: logins globex acme"]
    once = responses.save(
        tmp_path / "one.json", function="checks", integration="kit-test", base_url="", exchanges=exchanges[:1]
    )
    short = run(checks, provider=once)
    assert short.error == f"GET /me is not among the responses saved in {once} (left: none)"
    assert saved.exists()


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "no saved responses at {path} (`orchestrator dryrun checks ... --save-responses {folder}` saves them)"),
        ("[]", '{path} is not a file of saved responses (no "format": "orchestrator-responses/1")'),
        ("{", "{path} is not a file of saved responses: Expecting property name"),
        ('{"format": "orchestrator-responses/1", "exchanges": [{"method": "GET"}]}', "{path}: exchange 1 is not a"),
    ],
)
def test_bad_saved_responses_are_refused_in_one_line(tmp_path: Path, content: str | None, says: str) -> None:
    """A missing, foreign or damaged file of saved responses is one InvalidArgument naming it."""
    path = tmp_path / "checks.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InvalidArgument) as caught:
        run(checks, provider=tmp_path)
    assert str(caught.value).startswith(says.format(path=path, folder=tmp_path))


def test_the_integration_and_the_environment_are_given() -> None:
    """integration= settings over the defaults and env= variables are what the function sees, in its environment."""
    result = run(
        registers,
        provider={"POST /webhooks": (201, {"id": "wh1"})},
        environment="prod",
        integration={"base_url": "https://kit.test/v1", "auth": "bearer", "settings": {"tier": "gold"}},
        env={"APP_ID": "A1"},
    )
    assert result.ok, result
    assert result.logs == ["info: integration https://kit.test/v1 {'tier': 'gold'} env {'APP_ID': 'A1'}"]
    [request] = result.requests
    assert (request.url, request.path) == ("https://kit.test/v1/webhooks", "/webhooks")
    assert request.headers["authorization"] == "Bearer test-access-token", "stand-in credentials for bearer"


def test_the_metadata_is_validated_as_the_daemon_validates_it() -> None:
    """Stored metadata that does not match the function's model fails it, not retried, as in the daemon."""

    async def reads(ctx: Context) -> None:
        await ctx.get_metadata()

    function = on_event("post-connection-creation", integration="kit-test", metadata=Webhook)(reads)
    broken = run(function, metadata={"webhook_id": 3})
    assert (broken.outcome, broken.error_type, broken.retryable) == (Outcome.FAILED, "InvalidArgument", False)
    assert broken.error.startswith("stored metadata does not match Webhook")
    assert broken.metadata == {"webhook_id": 3}


def test_a_function_past_its_time_limit_times_out() -> None:
    """A cleanup that never ends times out at the time limit given, as the daemon's deadline would stop it."""
    result = run(hangs, time_limit=0.05)
    assert (result.outcome, result.error, result.retryable) == (Outcome.TIMED_OUT, "timed out after 0.05s", True)


def test_a_function_that_cannot_take_the_context_is_refused_as_discovery_would() -> None:
    """A decorated function with a second required parameter: the same message as a broken plugin's."""

    @on_event("validate-connection", integration="kit-test")
    async def takes_two(ctx: Context, extra: int) -> None:
        """Not callable with the context alone."""

    with pytest.raises(InvalidArgument, match=r"takes_two\(ctx, extra\) cannot be called with the context alone"):
        run(takes_two)


def test_an_installed_function_runs_by_name_with_its_plugins_defaults() -> None:
    """ "register-webhook" is the installed salesforce function: its plugin's base URL, its entry-point name."""
    result = run(
        "register-webhook",
        connection_config={"instance_url": "acme.test"},
        provider={"POST /webhooks": (201, {"id": 1})},
    )
    assert result.ok, result
    assert result.function == "register-webhook"
    assert result.requests[0].url == "https://acme.test/services/data/v60.0/webhooks"
    with pytest.raises(InvalidArgument, match="no installed plugin has an event function 'nope'"):
        run("nope")


@pytest.mark.anyio
async def test_arun_in_an_async_test_and_run_refused_there() -> None:
    """In an async test ``await arun(...)`` runs it; run() says to use arun instead of failing obscurely."""
    result = await arun(registers, provider={"POST /webhooks": (201, {"id": "wh1"})})
    assert result.ok, result
    with pytest.raises(RuntimeError, match=r"inside a running event loop: `await arun\(...\)` there"):
        run(registers)


def test_a_plain_def_runs_in_a_thread_of_its_own() -> None:
    """A plain def gets a SyncContext on a worker thread, as in the daemon."""
    threads: list[threading.Thread] = []

    def plain(ctx: Any) -> None:
        threads.append(threading.current_thread())
        ctx.update_metadata({"webhook_id": ctx.post("/webhooks").json()["id"]})

    result = run(on_event("post-connection-creation", integration="kit-test")(plain), provider={"POST *": {"id": "9"}})
    assert result.ok, result
    assert result.metadata == {"webhook_id": "9"}
    assert threads and threads[0] is not threading.current_thread()


def test_the_runner_keeps_its_defaults_and_results() -> None:
    """Runner(**defaults) applies them to each run, which a call may override, and keeps every result."""
    runner = Runner(provider={"POST /webhooks": (201, {"id": "wh1"})}, env={"APP_ID": "A1"})
    first = runner(registers)
    second = runner(registers, env={})
    assert [r.logs for r in runner.results] == [first.logs, second.logs]
    assert first.logs[0].endswith("env {'APP_ID': 'A1'}") and second.logs[0].endswith("env {}")


def test_the_fixture_shows_each_run_in_a_failing_test_s_report(pytester: pytest.Pytester) -> None:
    """run_function (the pytest plugin) runs a function; when the test fails, the report shows the run."""
    pytester.makepyfile(
        """
        from orchestrator import Context, on_event

        @on_event("post-connection-creation", integration="kit-test")
        async def posts(ctx: Context) -> None:
            await ctx.post("/webhooks")
            ctx.log("posted")

        def test_passes(run_function):
            assert run_function(posts, provider={"POST /webhooks": 201}).ok

        def test_fails(run_function):
            result = run_function(posts, provider={"POST /webhooks": 500})
            assert result.ok
        """
    )
    outcome = pytester.runpytest_subprocess("-p", "no:randomly", "-p", "no:cacheprovider")
    outcome.assert_outcomes(passed=1, failed=1)
    outcome.stdout.fnmatch_lines(
        [
            "*- orchestrator: function runs -*",
            "posts: failed: ProviderError: POST https://provider.test/webhooks answered 500*",
            "  http  POST /webhooks -> 500",
        ]
    )
