"""The GitHub scope check against a mocked provider, through the orchestrator's real Context and runner."""

from __future__ import annotations

import pytest
from fake_github import FakeGitHub
from orchestrator_github.scopes import check_token_scopes, granted

from orchestrator import LifecycleEvent, Rejected
from orchestrator.context import AttemptLog
from orchestrator.plugins import discover
from orchestrator.runner import run_attempt

pytestmark = pytest.mark.anyio


async def check(github: FakeGitHub, scopes: str, config: dict[str, object] | None = None) -> AttemptLog:
    """Run the check for a token granting ``scopes``; its log (raises what the function raises)."""
    github.scopes = scopes
    log = AttemptLog()
    await check_token_scopes.handler(github.context(check_token_scopes, log, config=config))
    return log


def test_entry_point_is_a_validate_function() -> None:
    """The installed distribution declares check-token-scopes for validate-connection of github."""
    [found] = [f for f in discover().functions if f.name == "check-token-scopes"]
    assert found.function is check_token_scopes
    assert (found.function.integration, found.function.event) == ("github", LifecycleEvent.VALIDATE_CONNECTION)
    assert (found.distribution, found.version) == ("orchestrator-github", "1.0.0")


async def test_calls_get_user_with_the_token(github: FakeGitHub) -> None:
    """The scopes are read from an authenticated GET https://api.github.com/user."""
    await check(github, "repo, read:org")
    [request] = github.requests
    assert (request.method, str(request.url)) == ("GET", "https://api.github.com/user")
    assert request.headers["authorization"] == "Bearer gho_T"


async def test_accepts_a_token_with_the_required_scopes(github: FakeGitHub) -> None:
    """A token with repo and read:org passes, and the log names the login and the scopes."""
    log = await check(github, "repo, read:org, gist")
    assert log.export() == ["info: token of octocat has read:org, repo"]


async def test_rejects_a_missing_scope_naming_it(github: FakeGitHub) -> None:
    """A token without read:org is Rejected with a message naming read:org only."""
    with pytest.raises(Rejected) as caught:
        await check(github, "repo")
    assert caught.value.message == "the token lacks the scope(s) read:org; reconnect and grant them"


async def test_rejects_a_token_without_scopes_naming_all(github: FakeGitHub) -> None:
    """No X-OAuth-Scopes at all names every required scope, sorted."""
    with pytest.raises(Rejected, match=r"lacks the scope\(s\) read:org, repo;"):
        await check(github, "")


async def test_accepts_implied_scopes(github: FakeGitHub) -> None:
    """admin:org grants read:org (GitHub's scope hierarchy), so repo + admin:org passes."""
    log = await check(github, "admin:org,repo")
    assert log.export() == ["info: token of octocat has read:org, repo"]
    assert granted("admin:org") == {"admin:org", "write:org", "read:org"}
    assert granted("write:org") == {"write:org", "read:org"}


async def test_an_implied_scope_does_not_imply_the_broader_one(github: FakeGitHub) -> None:
    """read:org does not grant admin:org when a connection requires admin:org."""
    with pytest.raises(Rejected, match=r"lacks the scope\(s\) admin:org;"):
        await check(github, "read:org", {"required_scopes": ["admin:org"]})


async def test_honours_required_scopes_from_connection_config(github: FakeGitHub) -> None:
    """connection_config required_scopes replaces the defaults: gist is demanded, repo no longer is."""
    config = {"required_scopes": ["gist", "read:org"]}
    with pytest.raises(Rejected) as caught:
        await check(github, "repo, read:org", config)
    assert caught.value.message == "the token lacks the scope(s) gist; reconnect and grant them"
    log = await check(github, "gist, write:org", config)
    assert log.export() == ["info: token of octocat has gist, read:org"]


async def test_the_runner_reports_a_clean_rejection(github: FakeGitHub) -> None:
    """Through run_attempt the rejection is a non-retryable verdict whose error is the function's message."""
    github.scopes = "repo"
    [installed] = discover().named("check-token-scopes", "github")
    result = await run_attempt(installed, lambda log: github.context(check_token_scopes, log), attempt=1, time_limit=10)
    assert (result.ok, result.rejected, result.retryable) == (False, True, False)
    assert result.error_type == "Rejected"
    assert result.error == "the token lacks the scope(s) read:org; reconnect and grant them"
