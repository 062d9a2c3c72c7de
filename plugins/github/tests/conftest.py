"""Fixtures for the GitHub plugin's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_github import FakeGitHub


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio, the daemon's event loop."""
    return "asyncio"


@pytest.fixture
async def github() -> AsyncIterator[FakeGitHub]:
    """A fake GitHub whose HTTP client is closed after the test."""
    fake = FakeGitHub()
    async with fake.client:
        yield fake
