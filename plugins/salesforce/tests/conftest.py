"""Fixtures for the Salesforce plugin's tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from fake_salesforce import FakeSalesforce


@pytest.fixture
def anyio_backend() -> str:
    """Run the async tests on asyncio, the daemon's event loop."""
    return "asyncio"


@pytest.fixture
async def salesforce() -> AsyncIterator[FakeSalesforce]:
    """A fake Salesforce whose HTTP client is closed after the test."""
    fake = FakeSalesforce()
    async with fake.client:
        yield fake
