"""Snapshot a new HubSpot connection's contact properties into its metadata.

This one is a plain ``def``: the orchestrator runs it in a worker thread, so
blocking code (a synchronous SDK, ``time.sleep``) cannot stall other
connections, and ``ctx`` methods are called without ``await``. It also brings
its own retry policy: HubSpot's property API is rate-limited per portal, so a
failure is retried at most 3 times, starting after 2 s.
"""

from __future__ import annotations

from typing import Any

from orchestrator import RetryPolicy, on_event


@on_event(
    "post-connection-creation",
    integration="hubspot",
    description="Record the portal's custom contact properties in metadata",
    timeout=30,
    retry=RetryPolicy(max_attempts=3, initial_interval=2.0, backoff=3.0, max_interval=30.0),
)
def snapshot_properties(ctx: Any) -> None:
    """Fetch contact properties and keep the names of the custom ones."""
    response = ctx.get("/crm/v3/properties/contacts")
    custom = sorted(p["name"] for p in response.json().get("results", []) if not p.get("hubspotDefined", False))
    ctx.update_metadata({"custom_properties": custom})
    ctx.log(f"{len(custom)} custom contact properties")
