"""The Prometheus endpoint of an ``orchestrator serve --metrics-listen`` subprocess: where it is, and its text.

The daemons themselves are :mod:`tests.support.process`'s (``serve``): they
log JSON lines to stderr, which the tests read line by line. The functions they
run are the example plugins installed in the development venv, pointed at a
local provider by :func:`tests.support.provider.write_config`.
"""

from __future__ import annotations

import re

import httpx

from tests.support.process import Running

PROMETHEUS = re.compile(r"serving Prometheus metrics on (http://127\.0\.0\.1:\d+/metrics)")
CALL_TIMEOUT = 20.0


def metrics_url(daemon: Running) -> str:
    """The Prometheus endpoint the daemon logged (before its ``serving`` line)."""
    for line in daemon.lines:
        if match := PROMETHEUS.search(line):
            return match[1]
    raise AssertionError(f"the daemon logged no Prometheus endpoint:\n{daemon}")


async def scrape(url: str) -> str:
    """GET the Prometheus text."""
    async with httpx.AsyncClient() as client:
        response = await client.get(url, timeout=CALL_TIMEOUT)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text
