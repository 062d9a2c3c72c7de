"""HubSpot event functions for the lifecycle orchestrator."""

INTEGRATION = {"base_url": "https://api.hubapi.com", "auth": "bearer"}
"""Defaults for ``[integrations.hubspot]``; the daemon's config overrides them."""
