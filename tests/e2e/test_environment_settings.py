"""The daemon's TOML: per-environment integration settings, the integration's own settings, environment variables."""

from __future__ import annotations

from pathlib import Path

from tests.support.process import run


def test_serve_check_reads_per_environment_settings_and_variables(tmp_path: Path) -> None:
    """The daemon's TOML takes [integrations.*.environments.*], [integrations.*.settings] and
    [environments.*.variables]; --check shows what each environment gets, and a bad variable is one line (a usage
    error, as any bad setting)."""
    config = tmp_path / "o.toml"
    config.write_text(
        "[integrations.acme]\nbase_url = 'https://acme.test'\nauth = 'bearer'\n"
        "[integrations.acme.settings]\ntier = 'gold'\n"
        "[integrations.acme.environments.prod]\nbase_url = 'https://prod.acme.test'\n"
        "[environments.prod.variables]\nSLACK_APP_ID = 'A0'\nWEBHOOK_URL = 'https://app.test'\n"
    )
    url = f"sqlite://{tmp_path / 'events.db'}"
    checked = run("serve", "--config", str(config), "--database", url, "--check", cwd=tmp_path)
    assert checked.code == 0, str(checked)
    lines = checked.out.splitlines()
    assert "integration acme: base_url https://acme.test, auth bearer" in lines
    assert "integration acme in prod: base_url https://prod.acme.test, auth bearer" in lines
    assert "environment prod: variables SLACK_APP_ID, WEBHOOK_URL" in lines
    config.write_text("[environments.prod.variables]\nRETRIES = 3\n")
    refused = run("serve", "--config", str(config), "--database", url, "--check", cwd=tmp_path)
    assert refused.code == 2, str(refused)
    assert refused.err == (
        f"orchestrator: error: {config}: environments.prod.variables.RETRIES = 3 is not a string: quote it\n"
    ), str(refused)
