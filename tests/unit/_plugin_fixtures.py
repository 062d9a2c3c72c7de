"""Objects that fake entry points of ``orchestrator.functions`` point at (see test_plugins.py)."""

from __future__ import annotations

from typing import Any

from orchestrator import Context, on_event


@on_event("validate-connection", integration="acme", description="Check the token")
async def check_token(ctx: Context) -> None:
    """A good validate function."""


@on_event("post-connection-creation", integration="acme", description="Register a webhook")
async def register_webhook(ctx: Context) -> None:
    """A good post-creation function."""


@on_event("post-connection-creation", integration="acme", description="Sync contacts (blocking client)")
def sync_contacts(ctx: Any) -> None:
    """A good plain (sync) post-creation function."""


@on_event("pre-connection-deletion", integration="acme", description="Delete the webhook")
async def delete_webhook(ctx: Context) -> None:
    """A good cleanup function."""


@on_event("validate-connection", integration="globex")
async def globex_check(ctx: Context) -> None:
    """A function of another integration."""


@on_event("validate-connection", integration="acme", description="one of two functions with one name")
async def duplicate_a(ctx: Context) -> None:
    """Shares its entry-point name with :func:`duplicate_b`."""


@on_event("post-connection-creation", integration="acme", description="the other of two functions with one name")
async def duplicate_b(ctx: Context) -> None:
    """Shares its entry-point name with :func:`duplicate_a`."""


async def undecorated(ctx: Context) -> None:
    """A function someone forgot to decorate with @on_event."""


NOT_A_FUNCTION = {"event": "validate-connection"}


@on_event("validate-connection", integration="acme")
async def takes_nothing() -> None:
    """Forgot the context."""


@on_event("validate-connection", integration="acme")
async def takes_two(ctx: Context, extra: int) -> None:
    """Takes a second parameter the runner never passes."""


@on_event("validate-connection", integration="acme")
def takes_the_context_by_keyword(*, ctx: Any) -> None:
    """Its one parameter cannot be passed positionally."""


@on_event("validate-connection", integration="acme")
async def takes_an_option(ctx: Context, verbose: bool = False) -> None:
    """A second parameter with a default is fine: it is called with the context alone."""
