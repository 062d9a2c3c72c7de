"""The EventStore and follow contracts on the PostgreSQL backend: each test a log of its own (a new schema)."""

from __future__ import annotations

import pytest

from tests.contract.test_follow_contract import FollowContract
from tests.contract.test_store_contract import StoreContract
from tests.support.postgres import Schemas

pytestmark = pytest.mark.anyio


class TestPostgresStore(StoreContract):
    """The contract on PostgreSQL."""

    @pytest.fixture
    async def url(self, postgres_schemas: Schemas) -> str:
        """A log in a new schema of the session's database."""
        return await postgres_schemas.new()


class TestPostgresFollow(FollowContract):
    """Following the PostgreSQL backend."""

    @pytest.fixture
    async def url(self, postgres_schemas: Schemas) -> str:
        """A log in a new schema of the session's database."""
        return await postgres_schemas.new()
