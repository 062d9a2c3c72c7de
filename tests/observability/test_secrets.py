"""A credential reaches the provider and nothing else: no span, log line, metric, record or answer holds it.

The credential is sent with every emit, echoed back by the provider in its
error bodies, logged by functions with ``ctx.log`` and put in the exceptions
they raise: every place the daemon could leak it is then searched for it.
"""

from __future__ import annotations

import base64
import json
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path

import pytest
from google.protobuf import json_format
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from orchestrator import Context, NonRetryable, Rejected
from orchestrator._proto.orchestrator.v1 import orchestrator_pb2 as pb
from orchestrator.config import Integration
from tests.support.daemon import function, serving
from tests.support.grpc import CREATE, DELETE, VALIDATE, emit, follow_until, records, ref
from tests.support.process import arun, environment, serve
from tests.support.provider import ProviderServer, Reply, Request, write_config

from . import _proc
from ._inproc import Spans
from ._otlp import Receiver

pytestmark = pytest.mark.anyio

SECRET = "s3cr3t-TOKEN-1234"
CREDENTIALS = {"access_token": SECRET, "api_key": SECRET, "username": "acme-bot", "password": SECRET}


def echo(status: int) -> Callable[[Request], Reply]:
    """A responder answering ``status`` with the request's credentials in the body, as careless APIs do."""

    def answer(request: Request) -> Reply:
        sent = {"authorization": request.headers.get("authorization", ""), "query": request.query}
        return Reply(status, {"error": "denied", "you_sent": sent})

    return answer


@pytest.fixture
def provider() -> Iterator[ProviderServer]:
    """A provider that echoes what it was sent in every error answer."""
    with ProviderServer() as server:
        server.route("GET", "/me", echo(401))
        server.route("POST", "/webhooks", echo(503))
        server.route("DELETE", "/webhooks/*", echo(404))
        yield server


def leaks(text: str, *needles: str) -> list[str]:
    """The lines of ``text`` that contain any of ``needles``."""
    return [line for line in text.splitlines() if any(n in line for n in needles)]


def everything_exported(exporter: Spans, reader: InMemoryMetricReader | None, lines: list[str]) -> str:
    """Every finished span (name, attributes, events, status, resource), metric and log line, as text."""
    spans = [s.to_json(indent=None) for s in exporter.get_finished_spans()]
    assert spans, "no span was exported: the search would prove nothing"
    metrics = reader.get_metrics_data() if reader is not None else None
    return "\n".join([*spans, metrics.to_json(indent=None) if metrics is not None else "", *lines])


async def test_a_credential_appears_in_no_span_log_line_metric_record_or_answer(
    tmp_path: Path, provider: ProviderServer, exporter: Spans, metric_reader: InMemoryMetricReader, log_lines: list[str]
) -> None:
    """Validate, create (retried, then given up), delete with leaky functions: the value is only at the provider."""

    async def picky(ctx: Context) -> None:
        ctx.log("checking the token", SECRET)
        await ctx.get("/me")  # 401, echoing the Authorization header

    async def leaky(ctx: Context) -> None:
        ctx.log("registering with", SECRET)
        if ctx.event.attempt == 1:
            await ctx.post("/webhooks")  # 503 (retryable), echoing the header
        raise NonRetryable(f"the provider refused {SECRET}")

    async def tidy(ctx: Context) -> None:
        ctx.log("deleting with", SECRET)
        await ctx.delete("/webhooks/wh_1")  # 404, echoing the header

    async def strict(ctx: Context) -> None:
        raise Rejected(f"token {SECRET} lacks the admin scope")

    functions = [
        function("picky", "validate-connection", picky),
        function("leaky", "post-connection-creation", leaky),
        function("tidy", "pre-connection-deletion", tidy),
        function("strict", "validate-connection", strict, integration="other"),
    ]
    integrations = {
        "acme": Integration("acme", base_url=provider.url, auth="bearer", retries=0),
        "other": Integration("other", base_url=provider.url, auth="bearer", retries=0),
    }
    async with serving(tmp_path, *functions, integrations=integrations) as daemon:
        stub = daemon.stub
        responses = [
            await emit(stub, VALIDATE, "conn-v", credentials=CREDENTIALS),
            await emit(stub, VALIDATE, "conn-o", integration="other", credentials=CREDENTIALS),
            await emit(stub, CREATE, "conn-c", credentials=CREDENTIALS, wait=True),
            await emit(stub, DELETE, "conn-c", credentials=CREDENTIALS),
        ]
        answers = [json_format.MessageToJson(response) for response in responses]
        for connection_id, integration in (("conn-v", "acme"), ("conn-o", "other"), ("conn-c", "acme")):
            shown = await stub.GetConnection(pb.GetConnectionRequest(connection=ref(connection_id, integration)))
            answers.append(json_format.MessageToJson(shown))
        log = [json_format.MessageToJson(r) for r in await records(stub)]

    # It was in play: the provider got it (and echoed it), the functions logged and raised it.
    assert {r.headers["authorization"] for r in provider.requests} == {f"Bearer {SECRET}"}
    assert len(provider.requests) == 3
    assert any("[redacted]" in line for line in log_lines)
    assert sum("[redacted]" in record for record in log) >= 4
    assert any('"outcome": "failed"' in line for line in log_lines)

    exported = everything_exported(exporter, metric_reader, log_lines)
    assert "function leaky" in exported and "HTTP POST" in exported
    assert leaks(exported, SECRET) == []
    assert leaks("\n".join(log), SECRET) == []
    assert leaks("\n".join(answers), SECRET) == []


async def test_a_query_parameter_credential_is_not_logged(
    tmp_path: Path, provider: ProviderServer, exporter: Spans, log_lines: list[str]
) -> None:
    """With auth query:api_key the key goes in the URL to the provider, and not into a log line or span."""
    provider.route("GET", "/me", Reply(200, {"login": "acme"}))

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")

    integrations = {"acme": Integration("acme", base_url=provider.url, auth="query:api_key", retries=0)}
    async with serving(
        tmp_path, function("whoami", "validate-connection", whoami), integrations=integrations
    ) as daemon:
        response = await emit(daemon.stub, VALIDATE, "conn-q", credentials={"api_key": SECRET})
    assert response.state == pb.CONNECTION_STATE_PENDING
    [sent] = provider.requests
    assert sent.param("api_key") == SECRET
    assert leaks(everything_exported(exporter, None, []), SECRET) == []
    assert leaks("\n".join(log_lines), SECRET) == []


async def test_an_echoed_basic_auth_header_is_redacted(
    tmp_path: Path, provider: ProviderServer, exporter: Spans, log_lines: list[str]
) -> None:
    """A provider echoing the Basic header back leaks no decodable form of the password either."""

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")  # 401, echoing the headers

    encoded = base64.b64encode(f"acme-bot:{SECRET}".encode()).decode()
    integrations = {"acme": Integration("acme", base_url=provider.url, auth="basic", retries=0)}
    async with serving(
        tmp_path, function("whoami", "validate-connection", whoami), integrations=integrations
    ) as daemon:
        response = await emit(daemon.stub, VALIDATE, "conn-b", credentials=CREDENTIALS)
        log = [json_format.MessageToJson(r) for r in await records(daemon.stub)]
    assert response.state == pb.CONNECTION_STATE_REJECTED
    [sent] = provider.requests
    assert sent.headers["authorization"] == f"Basic {encoded}"
    everywhere = "\n".join([everything_exported(exporter, None, log_lines), *log, str(response)])
    assert leaks(everywhere, SECRET, encoded) == []


async def test_a_credential_with_quotes_and_backslashes_echoed_in_json_is_redacted(
    tmp_path: Path, provider: ProviderServer, exporter: Spans, log_lines: list[str]
) -> None:
    """A token that JSON escapes, echoed in a JSON error body, reaches no record, span or log line in any form."""
    token = 'tok"en\\with/quotes+and %41 &amp;'

    async def whoami(ctx: Context) -> None:
        await ctx.get("/me")  # 401, echoing the Authorization header, JSON-escaped

    integrations = {"acme": Integration("acme", base_url=provider.url, auth="bearer", retries=0)}
    async with serving(
        tmp_path, function("whoami", "validate-connection", whoami), integrations=integrations
    ) as daemon:
        response = await emit(daemon.stub, VALIDATE, "conn-j", credentials={"access_token": token})
        log = [json_format.MessageToJson(r) for r in await records(daemon.stub)]
    assert response.state == pb.CONNECTION_STATE_REJECTED
    assert [r.headers["authorization"] for r in provider.requests] == [f"Bearer {token}"]
    everywhere = "\n".join([everything_exported(exporter, None, log_lines), *log, str(response)])
    assert "[redacted]" in everywhere
    escaped = json.dumps(token)[1:-1]
    assert leaks(everywhere, token, escaped, json.dumps(escaped)[1:-1], token.replace('"', "&quot;")) == []


@pytest.mark.slow
async def test_a_daemon_process_writes_no_credential_to_stderr_traces_or_prometheus(
    tmp_path: Path, provider: ProviderServer
) -> None:
    """``orchestrator serve`` exporting OTLP, with --metrics-listen: stderr, spans and /metrics hold no credential."""
    provider.route("GET", "/user", echo(401))
    provider.route("POST", "/acme/webhooks", echo(400))
    config = write_config(tmp_path / "o.toml", provider.url)
    with Receiver.grpc() as receiver:
        env = environment(**receiver.environment())
        args = ("--config", str(config), "--metrics-listen", "127.0.0.1:0", "--log-format", "json")
        async with serve(tmp_path / "events.db", *args, env=env) as daemon:
            rejected = await emit(daemon.address, VALIDATE, "gh-1", "github", credentials=CREDENTIALS)
            created = await emit(
                daemon.address,
                CREATE,
                "sf-1",
                "salesforce",
                credentials=CREDENTIALS,
                connection_config={"instance": "acme"},
                wait=True,
            )
            prometheus = await _proc.scrape(_proc.metrics_url(daemon))
            log = [json_format.MessageToJson(r) for r in await records(daemon.address)]
            assert await daemon.stop() == 0, str(daemon)
        # The exporter flushes at exit: every span is here now.
        spans = await receiver.wait_for(lambda s: s.name.startswith("function "), count=2)

    assert rejected.state == pb.CONNECTION_STATE_REJECTED
    assert [o.status for o in created.outcomes] == [pb.FUNCTION_STATUS_GAVE_UP]
    assert {r.headers["authorization"] for r in provider.requests} == {f"Bearer {SECRET}"}
    stderr = daemon.text
    assert "[redacted]" in stderr
    assert "orchestrator_function_attempts_total" in prometheus
    assert {s.name for s in spans} == {"function check-token-scopes", "function register-webhook"}
    assert leaks(stderr, SECRET) == []
    assert leaks("\n".join(s.raw for s in receiver.spans), SECRET) == []
    assert leaks(prometheus, SECRET) == []
    assert leaks("\n".join([*log, str(rejected), str(created)]), SECRET) == []
    assert json.loads(daemon.lines[-1])["message"] == "stopped; the event log is closed"


def on_disk(database: Path) -> bytes:
    """The database file and its WAL, as bytes on disk (read while the daemon runs)."""
    wal = database.with_name(database.name + "-wal")
    return database.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


@pytest.mark.slow
async def test_a_credential_is_nowhere_on_disk_or_in_cli_output_and_is_shredded_after_the_last_cleanup(
    tmp_path: Path, exporter: Spans, log_lines: list[str]
) -> None:
    """Sealed at rest (only ciphertext in its table), absent from the files, records, telemetry and CLI output;
    after the deletion and its last cleanup the row is gone and credentials-destroyed is in the log."""
    updated = "upd4ted-S3CRET-value-99"
    with ProviderServer() as provider:
        provider.route("POST", "/hooks", echo(201))
        provider.route("DELETE", "/hooks/*", Reply(204))

        async def register(ctx: Context) -> None:
            ctx.log("registering with", ctx.credentials["access_token"], repr(ctx.credentials))
            await ctx.post("/hooks")

        async def tidy(ctx: Context) -> None:
            if ctx.event.attempt == 1:
                raise RuntimeError(f"the provider refused {ctx.credentials['access_token']}")
            await ctx.delete("/hooks/wh_1")

        functions = [
            function("register", "post-connection-creation", register),
            function("tidy", "pre-connection-deletion", tidy),
        ]
        integrations = {"acme": Integration("acme", base_url=provider.url, auth="bearer", retries=0)}
        database = tmp_path / "events.db"
        async with serving(tmp_path, *functions, integrations=integrations) as daemon:
            address = f"127.0.0.1:{daemon.port}"
            created = await emit(daemon.stub, CREATE, "conn-d", credentials=CREDENTIALS, wait=True)
            setting = ("credentials", "set", "conn-d", "-i", "acme", "--credential", f"access_token={updated}")
            cli = [
                await arun(*setting, "--address", address),
                await arun("connections", "get", "conn-d", "-i", "acme", "--json", "--address", address),
                await arun("events", "--json", "--address", address),
            ]
            assert [c.code for c in cli] == [0, 0, 0], cli
            with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
                (sealed,) = db.execute("SELECT ciphertext, key_id FROM credentials").fetchall()
            while_running = on_disk(database)
            deleted = await emit(daemon.stub, DELETE, "conn-d")
            await follow_until(daemon.stub, lambda r: r.type == "credentials-destroyed")
            log = [json_format.MessageToJson(r) for r in await records(daemon.stub)]
            answers = [json_format.MessageToJson(m) for m in (created, deleted)]
        after = on_disk(database)
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            left = db.execute("SELECT COUNT(*) FROM credentials").fetchone()[0]

    # In play: the provider got both tokens, the functions logged and raised them, the table held ciphertext.
    assert [r.headers["authorization"] for r in provider.requests] == [f"Bearer {SECRET}", f"Bearer {updated}"]
    assert len(sealed[0]) > len(updated) and sealed[1]
    assert "fingerprint" in cli[0].out and "changed" in cli[0].out
    types = [json.loads(r)["type"] for r in log]
    assert types.count("credentials-updated") == 2
    assert types[-3:] == ["connection-deleted", "function-succeeded", "credentials-destroyed"]
    assert left == 0, "the row is gone once the deletion's last cleanup finished"
    # What the commands printed (their command lines hold the secret: that is the user's own input).
    texts = "\n".join([everything_exported(exporter, None, log_lines), *log, *answers, *(c.out + c.err for c in cli)])
    assert "[redacted]" in texts
    for secret in (SECRET, updated):
        assert secret.encode() not in while_running + after
        assert secret.encode() not in sealed[0]
        assert leaks(texts, secret) == []
