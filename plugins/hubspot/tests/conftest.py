"""Fixtures for the HubSpot plugin's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_hubspot import FakeHubSpot


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio, the daemon's event loop."""
    return "asyncio"


@pytest.fixture
async def hubspot() -> AsyncIterator[FakeHubSpot]:
    """A fake HubSpot whose HTTP client is closed after the test."""
    fake = FakeHubSpot()
    async with fake.client:
        yield fake
