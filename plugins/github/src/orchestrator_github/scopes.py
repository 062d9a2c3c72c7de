"""Reject a GitHub token that lacks the OAuth scopes the app needs.

GitHub lists a classic token's scopes in the ``X-OAuth-Scopes`` response
header of any authenticated call; ``GET /user`` is the cheapest such call.
The required scopes default to ``repo`` and ``read:org`` and can be set per
connection with ``connection_config["required_scopes"]``.
"""

from __future__ import annotations

from orchestrator import Context, Rejected, on_event

REQUIRED_SCOPES = ("repo", "read:org")
# A broader scope grants the narrower ones (GitHub's scope hierarchy).
IMPLIED = {"admin:org": {"write:org", "read:org"}, "write:org": {"read:org"}, "repo": {"repo:status", "public_repo"}}


def granted(header: str) -> set[str]:
    """The scopes a ``X-OAuth-Scopes`` header grants, including implied ones."""
    scopes = {s.strip() for s in header.split(",") if s.strip()}
    for scope in list(scopes):
        scopes |= IMPLIED.get(scope, set())
    return scopes


@on_event(
    "validate-connection",
    integration="github",
    description="Reject tokens without the repo and read:org scopes",
    timeout=10,
)
async def check_token_scopes(ctx: Context) -> None:
    """Call GET /user and compare the token's scopes with the required ones."""
    response = await ctx.get("/user")
    required = ctx.connection.config.get("required_scopes") or list(REQUIRED_SCOPES)
    missing = sorted(set(required) - granted(response.headers.get("x-oauth-scopes", "")))
    if missing:
        raise Rejected(f"the token lacks the scope(s) {', '.join(missing)}; reconnect and grant them")
    ctx.log("token of", response.json().get("login", "?"), "has", ", ".join(sorted(required)))
