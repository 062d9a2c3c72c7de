"""What the web console's pages show, computed without a server: the timeline's fold, ?until=, diffs, sessions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from orchestrator import errors, records, state
from orchestrator.access import ANYONE, parse_tokens
from orchestrator.config import ServeConfig
from orchestrator.console._app import STATUSES, http_status
from orchestrator.console._pages import safe_next
from orchestrator.console._session import Sessions
from orchestrator.console._views import Change, Timeline, metadata_diff, parse_until, tail_item, trace_href
from orchestrator.model import ConnectionRef, JSONObject, LifecycleEvent
from orchestrator.records import Record

REF = ConnectionRef("dev", "salesforce", "acme/1 %")
T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
ADMIN = "admin-token-0123456789abcdef"
DEV = "dev-token-0123456789abcdefgh"


def history() -> list[Record]:
    """A creation, its function's metadata write and failure, a second write merging a key, a deletion."""
    made: list[Record] = []

    def add(body: records.Body, cause: str = "") -> None:
        event = records.new(body, causation_id=cause, traceparent=TRACEPARENT)
        version = len(made) + 1
        made.append(
            Record(
                version, REF.stream, version, event.event_id, event.type, event.data, T0 + timedelta(seconds=version),
                event.causation_id, event.traceparent,
            )
        )  # fmt: skip

    add(records.Lifecycle(LifecycleEvent.POST_CONNECTION_CREATION, {"instance": "acme"}, {}))
    created = made[0].event_id
    add(records.MetadataUpdated("register-webhook", {"webhook_id": "wh_1", "n": 1}, merge=False), created)
    add(
        records.FunctionFailed(
            "register-webhook", 1, 12, "acme-plugin", "1.2.3", "KeyError", "'id'", True,
            traceback='Traceback (most recent call last):\n  File "p.py", line 3, in f\nKeyError: \'id\'',
        ),
        created,
    )  # fmt: skip
    add(records.MetadataUpdated("register-webhook", {"n": 2, "extra": [1]}, merge=True), created)
    add(records.Lifecycle(LifecycleEvent.PRE_CONNECTION_DELETION, {}, {}))
    add(records.ConnectionDeleted(), made[-1].event_id)
    return made


def test_the_timeline_folds_with_the_daemons_fold_and_keeps_each_state_after() -> None:
    """Each row's state is the fold of the records up to it; the end is state.fold of them all."""
    log = history()
    timeline = Timeline(REF, trace_url="http://jaeger/trace/{trace_id}")
    for record in log:
        assert timeline.add(record)
    assert timeline.connection == state.fold(log)
    assert [row.state_after for row in timeline.rows] == [state.fold(log[: i + 1]).state.value for i in range(6)]  # type: ignore[union-attr]
    assert [row.kind for row in timeline.rows] == ["lifecycle", "info", "bad", "info", "lifecycle", "end"]
    failed = timeline.rows[2].attempt
    assert failed is not None and failed.outcome == "failed" and failed.plugin == "acme-plugin 1.2.3"
    assert failed.traceback.endswith("KeyError: 'id'") and failed.duration_ms == 12 and failed.retryable is True
    assert timeline.rows[2].summary == "", "an attempt's row says it in its attempt"
    assert timeline.rows[1].changes == (Change("n", "added", after="1"), Change("webhook_id", "added", after='"wh_1"'))
    assert timeline.rows[3].changes == (Change("extra", "added", after="[1]"), Change("n", "changed", "1", "2"))
    assert timeline.rows[0].trace_href == "http://jaeger/trace/4bf92f3577b34da6a3ce929d0e0e4736"
    assert timeline.rows[0].as_of_href == "/connections/dev/salesforce/acme%2F1%20%25?until=1"


@pytest.mark.parametrize(
    ("until", "rows"),
    [
        pytest.param("2", 2, id="a-position"),
        pytest.param("2026-01-01T12:00:03Z", 3, id="a-time"),
        pytest.param("2026-01-01T12:00:03", 3, id="a-time-without-zone-is-utc"),
        pytest.param("2026-01-01T11:00:00+00:00", 0, id="before-the-first"),
    ],
)
def test_until_stops_the_fold_where_replay_until_would(until: str, rows: int) -> None:
    """?until= a position or a time: the rows and the connection as they were then; nothing read beyond."""
    log = history()
    timeline = Timeline(REF, parse_until(until))
    for record in log:
        if not timeline.add(record):
            break
    assert len(timeline.rows) == rows and timeline.ended
    assert timeline.connection == state.fold(log[:rows])


@pytest.mark.parametrize("bad", ["yesterday", "-1", "1.5", str(2**63), "2026-13-01"])
def test_a_bad_until_is_refused_naming_what_it_takes(bad: str) -> None:
    """Neither a position nor an ISO-8601 time: InvalidArgument (a 400 page)."""
    with pytest.raises(errors.InvalidArgument, match="position"):
        parse_until(bad)


def test_metadata_diff_names_added_removed_and_changed_keys_in_order() -> None:
    """Keys in order; values as compact JSON; equal values are no change."""
    before: JSONObject = {"a": 1, "b": {"x": [1, 2]}, "c": "same"}
    after: JSONObject = {"b": {"x": [1, 3]}, "c": "same", "d": None}
    assert metadata_diff(before, after) == (
        Change("a", "removed", before="1"),
        Change("b", "changed", '{"x":[1,2]}', '{"x":[1,3]}'),
        Change("d", "added", after="null"),
    )
    assert metadata_diff(after, after) == ()


def test_a_trace_link_needs_a_template_and_a_valid_traceparent() -> None:
    """No --trace-url, or a record without a (valid) traceparent: no link."""
    assert trace_href("", TRACEPARENT) == ""
    assert trace_href("http://j/{trace_id}", "") == ""
    assert trace_href("http://j/{trace_id}", "00-" + "0" * 32 + "-" + "1" * 16 + "-01") == ""
    assert trace_href("http://j/t/{trace_id}?x={y}", TRACEPARENT) == "http://j/t/4bf92f3577b34da6a3ce929d0e0e4736?x={y}"


def test_a_live_tail_item_escapes_the_connection_id_and_summarises_a_failure() -> None:
    """The link of an id holding '/', ' ' and '%' names that connection; a failure's line says its error."""
    item = tail_item(history()[2])
    assert item["href"] == "/connections/dev/salesforce/acme%2F1%20%25"
    assert item["summary"] == "register-webhook attempt 1: KeyError: 'id'" and item["kind"] == "bad"
    assert tail_item(history()[0])["summary"] == ""


def test_a_session_follows_the_token_file_and_ends_when_idle_or_out() -> None:
    """Only a known token logs in; a token removed from the file, or a session idle too long, is logged out."""
    now = [0.0]
    tokens = [parse_tokens(f"{ADMIN}\n{DEV} dev\n", "tokens")]
    sessions = Sessions(lambda: tokens[0], idle=100, limit=2, monotonic=lambda: now[0])
    assert sessions.login("x" * 20) is None
    started = sessions.login(DEV)
    assert started is not None
    sid, principal = started
    assert principal.environments == frozenset({"dev"}) and sessions.caller(sid) == principal
    assert sessions.csrf_ok(sid, sessions.csrf(sid)) and not sessions.csrf_ok(sid, sessions.csrf("other"))
    assert not sessions.csrf_ok("", sessions.csrf(""))
    now[0] = 99.0
    assert sessions.caller(sid) == principal, "a request keeps the session alive"
    now[0] = 199.0 + 1
    assert sessions.caller(sid) is None, "idle too long"
    sid = sessions.login(DEV)[0]  # type: ignore[index]
    tokens[0] = parse_tokens(f"{ADMIN}\n", "tokens")  # SIGHUP after DEV was removed
    assert sessions.caller(sid) is None and len(sessions) == 0
    for _ in range(3):
        sessions.login(ADMIN)
    assert len(sessions) == 2, "the least recently used sessions go beyond the limit"
    assert Sessions(lambda: None).caller("anything") is ANYONE


def test_every_error_of_the_service_has_an_http_status() -> None:
    """Every error class maps to a status through its nearest mapped base (as none is UNKNOWN over gRPC)."""
    classes: list[Any] = [errors.OrchestratorError]
    unmapped = []
    while classes:
        cls = classes.pop()
        classes += cls.__subclasses__()
        if cls is not errors.OrchestratorError and not any(base in STATUSES for base in cls.__mro__):
            unmapped.append(cls.__name__)
    assert unmapped == []
    assert http_status(errors.VersionConflict("dev/a/b", 1, 2)) == 409
    assert http_status(errors.PermissionDenied("no")) == 403


@pytest.mark.parametrize(
    ("sent", "kept"),
    [("/jobs?status=queued", "/jobs?status=queued"), ("//evil.example/x", "/"), ("https://evil", "/"), ("/\\x", "/")],
)
def test_a_form_goes_back_only_to_a_page_of_the_console(sent: str, kept: str) -> None:
    """The ``next`` of a form is a local path, never another site (an open redirect)."""
    assert safe_next(sent) == kept


def test_a_console_on_the_network_needs_tls_or_tokens_and_a_trace_url_its_placeholder() -> None:
    """The gRPC rule for non-loopback addresses holds for --web-listen; --trace-url must hold {trace_id}."""
    with pytest.raises(errors.InvalidArgument, match=r"web console on 0\.0\.0\.0:50080"):
        ServeConfig(web_listen="0.0.0.0:50080")
    ServeConfig(web_listen="0.0.0.0:50080", insecure=True)
    ServeConfig(web_listen="0.0.0.0:50080", auth_token_file=Path("tokens"))
    ServeConfig(web_listen="")
    with pytest.raises(errors.InvalidArgument, match="trace_id"):
        ServeConfig(trace_url="http://jaeger:16686/trace/")
    with pytest.raises(errors.InvalidArgument, match="http"):
        ServeConfig(trace_url="javascript:alert(1)//{trace_id}")
