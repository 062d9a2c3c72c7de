"""W3C traceparent validation: what the daemon continues and stores, and what it drops as absent."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import trace

from orchestrator.tracing import TRACEPARENT_LENGTH, context_from, valid_traceparent

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"

HEX = "0123456789abcdef"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        pytest.param(VALID, VALID, id="version-00"),
        pytest.param(f"00-{TRACE}-{PARENT}-00", f"00-{TRACE}-{PARENT}-00", id="not-sampled"),
        pytest.param(f" {VALID}\t", VALID, id="surrounding-whitespace"),
        pytest.param(f"01-{TRACE}-{PARENT}-01", f"01-{TRACE}-{PARENT}-01", id="later-version"),
        pytest.param(f"01-{TRACE}-{PARENT}-01-more", f"01-{TRACE}-{PARENT}-01", id="later-version-extended"),
        pytest.param(f"01-{TRACE}-{PARENT}-01" + "-x" * 5000, f"01-{TRACE}-{PARENT}-01", id="later-version-long"),
        pytest.param("", "", id="empty"),
        pytest.param("x" * 7023, "", id="junk"),
        pytest.param(f"{VALID}-more", "", id="version-00-extended"),
        pytest.param(f"01-{TRACE}-{PARENT}-01more", "", id="later-version-no-dash"),
        pytest.param(f"ff-{TRACE}-{PARENT}-01", "", id="version-ff"),
        pytest.param(f"00-{'0' * 32}-{PARENT}-01", "", id="zero-trace-id"),
        pytest.param(f"00-{TRACE}-{'0' * 16}-01", "", id="zero-parent-id"),
        pytest.param(VALID.upper(), "", id="uppercase"),
        pytest.param(VALID[:-1], "", id="short"),
        pytest.param(f"00-{TRACE}-{PARENT}-0g", "", id="bad-flags"),
        pytest.param(f"00_{TRACE}_{PARENT}_01", "", id="bad-separators"),
        pytest.param(f"0-{TRACE}-{PARENT}-01", "", id="bad-version"),
        pytest.param(f"00-{TRACE}-{PARENT}-01\n", "", id="newline"),
    ],
)
def test_traceparents(sent: str, kept: str) -> None:
    """A valid traceparent is kept (a later version's first 55 characters); anything else is dropped."""
    assert valid_traceparent(sent) == kept


@given(st.text())
def test_whatever_is_sent_what_is_kept_is_empty_or_a_bounded_traceparent(sent: str) -> None:
    """Any text gives ``""`` or at most 55 characters of the traceparent form."""
    kept = valid_traceparent(sent)
    assert kept == "" or (len(kept) == TRACEPARENT_LENGTH and valid_traceparent(kept) == kept)


@given(
    st.text(HEX, min_size=32, max_size=32).filter(lambda t: set(t) != {"0"}),
    st.text(HEX, min_size=16, max_size=16).filter(lambda p: set(p) != {"0"}),
    st.text(HEX, min_size=2, max_size=2),
)
def test_every_valid_version_00_traceparent_is_kept(trace_id: str, parent_id: str, flags: str) -> None:
    """Every well-formed version-00 traceparent is kept as sent."""
    sent = f"00-{trace_id}-{parent_id}-{flags}"
    assert valid_traceparent(sent) == sent


def test_an_invalid_traceparent_gives_no_parent() -> None:
    """The context of an invalid traceparent has no parent span: the span it starts is a new trace."""
    assert trace.get_current_span(context_from(VALID)).get_span_context().trace_id == int(TRACE, 16)
    assert not trace.get_current_span(context_from(f"{VALID}-more")).get_span_context().is_valid
