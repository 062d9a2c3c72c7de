"""Fixtures shared by every test."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    """Run ``@pytest.mark.anyio`` tests on asyncio, the loop the daemon runs on."""
    return "asyncio"
