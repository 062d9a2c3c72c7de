"""The GitHub scope check, run as the daemon runs it (orchestrator.testing) against canned GitHub answers."""

from __future__ import annotations

from typing import Any

from orchestrator_github.scopes import check_token_scopes, granted

from orchestrator import LifecycleEvent
from orchestrator.plugins import discover
from orchestrator.testing import Outcome, Result, Runner, run


def check(scopes: str, config: dict[str, Any] | None = None, *, runner: Any = run) -> Result:
    """The check of a token granting ``scopes`` (GET /user answers with them in ``X-OAuth-Scopes``)."""
    user = (200, {"login": "octocat"}, {"X-OAuth-Scopes": scopes})
    return runner(
        check_token_scopes,
        provider={"GET /user": user},
        connection_config=config or {},
        credentials={"access_token": "gho_T"},
    )


def test_entry_point_is_a_validate_function() -> None:
    """The installed distribution declares check-token-scopes for validate-connection of github."""
    [found] = [f for f in discover().functions if f.name == "check-token-scopes"]
    assert found.function is check_token_scopes
    assert (found.function.integration, found.function.event) == ("github", LifecycleEvent.VALIDATE_CONNECTION)
    assert (found.distribution, found.version) == ("orchestrator-github", "1.0.0")


def test_calls_get_user_with_the_token(run_function: Runner) -> None:
    """The scopes are read from an authenticated GET https://api.github.com/user (the plugin's default base URL)."""
    result = check("repo, read:org", runner=run_function)
    assert result.ok, result
    [request] = result.requests
    assert (request.method, request.url) == ("GET", "https://api.github.com/user")
    assert request.headers["authorization"] == "Bearer gho_T"


def test_accepts_a_token_with_the_required_scopes() -> None:
    """A token with repo and read:org passes, and the log names the login and the scopes."""
    result = check("repo, read:org, gist")
    assert result.ok, result
    assert result.logs == ["info: token of octocat has read:org, repo"]


def test_rejects_a_missing_scope_naming_it() -> None:
    """A token without read:org is rejected with a message naming read:org only, not retried."""
    result = check("repo")
    assert (result.outcome, result.retryable) == (Outcome.REJECTED, False)
    assert result.error == "the token lacks the scope(s) read:org; reconnect and grant them"


def test_rejects_a_token_without_scopes_naming_all() -> None:
    """No X-OAuth-Scopes at all names every required scope, sorted."""
    result = check("")
    assert result.rejected, result
    assert result.error.startswith("the token lacks the scope(s) read:org, repo;")


def test_accepts_implied_scopes() -> None:
    """admin:org grants read:org (GitHub's scope hierarchy), so repo + admin:org passes."""
    assert check("admin:org,repo").logs == ["info: token of octocat has read:org, repo"]
    assert granted("admin:org") == {"admin:org", "write:org", "read:org"}
    assert granted("write:org") == {"write:org", "read:org"}


def test_an_implied_scope_does_not_imply_the_broader_one() -> None:
    """read:org does not grant admin:org when a connection requires admin:org."""
    result = check("read:org", {"required_scopes": ["admin:org"]})
    assert result.rejected, result
    assert result.error.startswith("the token lacks the scope(s) admin:org;")


def test_honours_required_scopes_from_connection_config() -> None:
    """connection_config required_scopes replaces the defaults: gist is demanded, repo no longer is."""
    config = {"required_scopes": ["gist", "read:org"]}
    refused = check("repo, read:org", config)
    assert refused.error == "the token lacks the scope(s) gist; reconnect and grant them"
    accepted = check("gist, write:org", config)
    assert accepted.logs == ["info: token of octocat has gist, read:org"]


def test_a_provider_refusal_fails_without_retries() -> None:
    """GitHub answering 401 (a revoked token) fails the check, not retried: no verdict on the scopes."""
    result = run(check_token_scopes, provider={"GET /user": (401, {"message": "Bad credentials"})})
    assert (result.outcome, result.error_type, result.retryable) == (Outcome.FAILED, "ProviderError", False)
    assert "401" in result.error
