"""GitHub event functions for the lifecycle orchestrator."""

INTEGRATION = {"base_url": "https://api.github.com", "auth": "bearer"}
"""Defaults for ``[integrations.github]``; the daemon's config overrides them."""
