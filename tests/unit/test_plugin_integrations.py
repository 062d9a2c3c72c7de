"""Integration settings: the defaults plugins ship, overridden by the daemon's configuration."""

from __future__ import annotations

from importlib.metadata import EntryPoint

from orchestrator.config import Integration
from orchestrator.plugins import INTEGRATIONS_GROUP, integrations

MODULE = __name__
ACME_DEFAULTS = {"base_url": "https://{instance_url}", "auth": "bearer"}
GLOBEX_DEFAULTS = {"base_url": "https://{instance_url}/api", "auth": "bearer"}
NOT_A_MAPPING = ["base_url"]


def ep(name: str, target: str) -> EntryPoint:
    """An entry point of the integrations group, with no distribution (as in a test)."""
    return EntryPoint(name, f"{MODULE}:{target}", INTEGRATIONS_GROUP)


def test_configured_settings_replace_a_plugins_defaults_and_the_rest_are_kept() -> None:
    """A configured integration wins whole; defaults nobody configured stay; configured-only ones are added."""
    shipped = [ep("acme", "ACME_DEFAULTS"), ep("globex", "GLOBEX_DEFAULTS")]
    configured = {
        "acme": Integration("acme", base_url="https://acme.test", auth="basic"),
        "initech": Integration("initech"),
    }

    found, broken = integrations(configured, shipped)

    assert broken == []
    assert found == {
        "acme": Integration("acme", base_url="https://acme.test", auth="basic"),
        "globex": Integration("globex", base_url="https://{instance_url}/api", auth="bearer"),
        "initech": Integration("initech"),
    }


def test_broken_defaults_are_reported_and_left_out() -> None:
    """Defaults that are not a mapping are reported as a broken plugin; the configured ones still apply."""
    found, broken = integrations({"acme": Integration("acme")}, [ep("globex", "NOT_A_MAPPING")])

    assert found == {"acme": Integration("acme")}
    assert [(b.name, b.entry_point) for b in broken] == [("globex", f"{MODULE}:NOT_A_MAPPING")]
    assert "is not a mapping" in broken[0].reason
