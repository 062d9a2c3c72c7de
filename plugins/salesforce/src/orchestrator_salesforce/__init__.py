"""Salesforce event functions for the lifecycle orchestrator."""

INTEGRATION = {"base_url": "https://{instance_url}/services/data/v60.0", "auth": "bearer"}
"""Defaults for ``[integrations.salesforce]``; the daemon's config overrides them."""
