"""``orchestrator new NAME --integration I``: a plugin distribution whose tests pass as generated.

It writes, under ``NAME/``: ``pyproject.toml`` (the entry points of one
function per lifecycle event and of the integration's defaults, a ``test``
extra with pytest), ``src/<package>/__init__.py`` (the defaults),
``src/<package>/functions.py`` (the three functions), ``tests/test_functions.py``
(their tests, on :mod:`orchestrator.testing`'s ``run_function`` fixture),
``README.md`` and ``.gitignore``. Nothing is written when NAME exists or a
name is not usable.
"""

from __future__ import annotations

import keyword
import re
import sys
from pathlib import Path

from orchestrator.errors import InvalidArgument
from orchestrator.model import check_name

_DISTRIBUTION = re.compile(r"[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
_RESERVED = frozenset({"orchestrator", "lifecycle-orchestrator", "test", "tests", "src"})
FUNCTIONS = ("check-credentials", "register-webhook", "delete-webhook")
"""The entry-point names of the generated functions (one per lifecycle event)."""


def package_of(name: str) -> str:
    """The import package of distribution ``name``: ``orchestrator-acme`` -> ``orchestrator_acme``."""
    return name.replace("-", "_")


def check(name: str, integration: str) -> None:
    """:class:`InvalidArgument` (one line) when ``name`` cannot be a distribution and package, or ``integration``
    is not an integration name."""
    if not _DISTRIBUTION.fullmatch(name) or len(name) > 64:
        raise InvalidArgument(
            f"NAME {name!r} is not a plugin distribution name: lower-case letters and digits in words joined by"
            " single '-', starting with a letter, at most 64 characters (like orchestrator-acme)"
        )
    package = package_of(name)
    if keyword.iskeyword(package):
        raise InvalidArgument(
            f"NAME {name!r} would make the package {package}, a Python keyword: try orchestrator-{name}"
        )
    if name in _RESERVED or package in sys.stdlib_module_names:
        raise InvalidArgument(
            f"NAME {name!r} would make the package {package}, which shadows another: try orchestrator-{name}"
        )
    try:
        check_name("--integration", integration)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc} (like salesforce or github)") from None


def files(name: str, integration: str, version: str) -> dict[str, str]:
    """The generated files' text by path relative to ``NAME/``."""
    package = package_of(name)
    values = {
        "name": name,
        "package": package,
        "integration": integration,
        "version": version,
        "base_url": f"https://api.{integration}.example",
    }
    return {path.format(**values): template.format(**values) for path, template in _TEMPLATES.items()}


def create(directory: Path, integration: str, version: str) -> list[Path]:
    """Write the distribution into ``directory`` (named NAME, which must not exist); the files written."""
    name = directory.name
    check(name, integration)
    if directory.exists() or directory.is_symlink():
        raise InvalidArgument(f"{directory} already exists: choose another NAME, or move it away first")
    written = []
    try:
        directory.mkdir(parents=True)
        for relative, text in files(name, integration, version).items():
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
    except OSError as exc:
        raise InvalidArgument(f"cannot write {directory}: {exc.strerror or exc}") from None
    return written


_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "{name}"
version = "0.1.0"
description = "Event functions for {integration} connections, run by the lifecycle orchestrator."
readme = "README.md"
requires-python = ">=3.11"
dependencies = ["lifecycle-orchestrator>={version}", "pydantic>=2.8"]

[project.optional-dependencies]
test = ["pytest>=8"]

# The entry-point name is the function's name (orchestrator functions, dryrun, the log).
[project.entry-points."orchestrator.functions"]
check-credentials = "{package}.functions:check_credentials"
register-webhook = "{package}.functions:register_webhook"
delete-webhook = "{package}.functions:delete_webhook"

# The integration's defaults; the daemon's [integrations.{integration}] settings override them.
[project.entry-points."orchestrator.integrations"]
{integration} = "{package}:INTEGRATION"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
testpaths = ["tests"]

[tool.ruff]
line-length = 120

[tool.ruff.lint.isort]
known-first-party = ["{package}"]
"""

_INIT = '''\
"""Event functions for {integration} connections, run by the lifecycle orchestrator."""

INTEGRATION = {{"base_url": "{base_url}", "auth": "bearer"}}
"""Defaults for ``[integrations.{integration}]`` (base URL, auth scheme: none, bearer, basic, header:<Name> or
query:<name>); the daemon's config overrides them, per environment too."""
'''

_FUNCTIONS = '''\
"""The {integration} event functions: one per lifecycle event.

- check-credentials (validate-connection): the provider must accept the connection's credentials;
- register-webhook (post-connection-creation): register a webhook once, keep its id in the metadata;
- delete-webhook (pre-connection-deletion): delete it again (one already gone is fine).

Calls go through ``ctx``'s proxy: the base URL and the credentials come from the integration's settings
and the connection. A creation job is retried (at least once delivery): each function must be safe to run
again.
"""

from __future__ import annotations

from orchestrator import Context, ProviderError, Rejected, on_event
from pydantic import BaseModel

INTEGRATION = "{integration}"
DEFAULT_WEBHOOK_URL = "https://example.com/webhooks/{integration}"
"""Where the provider is to send events, unless the environment sets the variable WEBHOOK_URL."""


class Metadata(BaseModel):
    """What these functions keep on a connection."""

    webhook_id: str | None = None


@on_event(
    "validate-connection",
    integration=INTEGRATION,
    description="Reject credentials the provider refuses",
    timeout=10,
)
async def check_credentials(ctx: Context) -> None:
    """GET /me with the connection's credentials: a 401 or 403 rejects the connection."""
    try:
        response = await ctx.get("/me")
    except ProviderError as exc:
        if exc.status in (401, 403):
            raise Rejected(f"the provider refused the credentials ({{exc.status}}): reconnect") from None
        raise
    ctx.log("credentials accepted for", response.json().get("id", "?"))


@on_event(
    "post-connection-creation",
    integration=INTEGRATION,
    description="Register a webhook after a connection is created",
    metadata=Metadata,
)
async def register_webhook(ctx: Context) -> None:
    """Register the webhook (once per connection) and keep its id."""
    metadata: Metadata = await ctx.get_metadata()
    if metadata.webhook_id:
        ctx.log("webhook already registered:", metadata.webhook_id)
        return
    response = await ctx.post("/webhooks", json={{"url": ctx.env.get("WEBHOOK_URL", DEFAULT_WEBHOOK_URL)}})
    webhook_id = str(response.json()["id"])
    await ctx.update_metadata({{"webhook_id": webhook_id}})
    ctx.log("registered webhook", webhook_id)


@on_event(
    "pre-connection-deletion",
    integration=INTEGRATION,
    description="Delete the webhook before a connection is deleted",
    metadata=Metadata,
)
async def delete_webhook(ctx: Context) -> None:
    """Delete the webhook; one that is already gone (404) is fine."""
    metadata: Metadata = await ctx.get_metadata()
    if not metadata.webhook_id:
        ctx.log("no webhook to delete")
        return
    try:
        await ctx.delete(f"/webhooks/{{metadata.webhook_id}}")
    except ProviderError as exc:
        if exc.status != 404:
            raise
        ctx.log("webhook", metadata.webhook_id, "was already gone")
    await ctx.update_metadata({{"webhook_id": None}})
'''

_TESTS = '''\
"""{name}'s functions, run as the daemon runs them (``orchestrator.testing``) against canned answers.

``run_function`` is the orchestrator's pytest fixture: it runs one attempt (same runner, timeout and metadata
validation as the daemon) and returns the outcome, the metadata after, the log lines and the requests made.
The credentials are stand-ins for the auth scheme (``Bearer test-access-token``) unless given.
"""

from __future__ import annotations

from orchestrator.testing import Outcome, Runner

from {package}.functions import check_credentials, delete_webhook, register_webhook


def test_check_credentials_accepts_what_the_provider_accepts(run_function: Runner) -> None:
    """GET /me answered 200: the connection is valid; the call carried the bearer token."""
    result = run_function(check_credentials, provider={{"GET /me": {{"id": "user-1"}}}})
    assert result.ok, result
    [request] = result.requests
    assert (request.method, request.path) == ("GET", "/me")
    assert request.headers["authorization"] == "Bearer test-access-token"
    assert result.logs == ["info: credentials accepted for user-1"]


def test_check_credentials_rejects_credentials_the_provider_refuses(run_function: Runner) -> None:
    """GET /me answered 401: the connection is rejected with a message for the user."""
    result = run_function(check_credentials, provider={{"GET /me": (401, {{"error": "invalid token"}})}})
    assert result.outcome is Outcome.REJECTED, result
    assert result.error == "the provider refused the credentials (401): reconnect"


def test_register_webhook_keeps_the_webhook_id(run_function: Runner) -> None:
    """The webhook is registered at the environment's WEBHOOK_URL and its id kept in the metadata."""
    result = run_function(
        register_webhook,
        provider={{"POST /webhooks": (201, {{"id": "wh1"}})}},
        env={{"WEBHOOK_URL": "https://app.example/hooks"}},
    )
    assert result.ok, result
    assert result.requests[0].json() == {{"url": "https://app.example/hooks"}}
    assert result.metadata == {{"webhook_id": "wh1"}}


def test_register_webhook_runs_again_without_a_second_webhook(run_function: Runner) -> None:
    """A retried job finds the id in the metadata and calls nothing."""
    result = run_function(register_webhook, metadata={{"webhook_id": "wh1"}})
    assert result.ok, result
    assert result.requests == []


def test_delete_webhook_deletes_it_and_forgets_its_id(run_function: Runner) -> None:
    """DELETE /webhooks/wh1, then the id is cleared."""
    result = run_function(delete_webhook, provider={{"DELETE /webhooks/wh1": 204}}, metadata={{"webhook_id": "wh1"}})
    assert result.ok, result
    assert [str(request) for request in result.requests] == ["DELETE /webhooks/wh1 -> 204"]
    assert result.metadata == {{"webhook_id": None}}


def test_delete_webhook_of_a_webhook_already_gone_succeeds(run_function: Runner) -> None:
    """A 404 counts as deleted: cleanup is retried, and the provider may have removed it first."""
    result = run_function(delete_webhook, provider={{"DELETE /webhooks/*": 404}}, metadata={{"webhook_id": "wh1"}})
    assert result.ok, result
    assert result.logs == ["info: webhook wh1 was already gone"]
'''

_README = """\
# {name}

Event functions for **{integration}** connections, run by the lifecycle orchestrator:

| function | event | what it does |
| --- | --- | --- |
| `check-credentials` | `validate-connection` | `GET /me`; a 401 or 403 rejects the connection |
| `register-webhook` | `post-connection-creation` | `POST /webhooks` (the `WEBHOOK_URL` variable), keeps `webhook_id` |
| `delete-webhook` | `pre-connection-deletion` | `DELETE /webhooks/<webhook_id>`; a 404 counts as deleted |

The integration's defaults are in `src/{package}/__init__.py` (`INTEGRATION`): set its
real `base_url` and `auth`. The daemon's `[integrations.{integration}]` settings override them.

## Test

```sh
pip install -e '.[test]'
pytest
```

The tests run each function as the daemon runs it, against canned answers
(`orchestrator.testing`, the `run_function` fixture).

## Try it against the provider

```sh
orchestrator functions
orchestrator dryrun check-credentials try-1 -i {integration} --connection-config '{{}}' \\
    --credential access_token=... --config orchestrator.toml
```

`--connection-config` and `--metadata` run against a connection that is not in
the log yet; requests that change the provider (not GET or HEAD) are real, and
dryrun warns before the first one. `--save-responses DIR` keeps what the provider
answered, for a test to replay (`run_function(..., provider="DIR")`).

## Deploy

Install this distribution into the daemon's environment, then restart the
daemon (SIGTERM drains it): see the orchestrator's docs/writing-functions.md.
"""

_GITIGNORE = """\
__pycache__/
*.egg-info/
build/
dist/
.orchestrator/
"""

_TEMPLATES = {
    "pyproject.toml": _PYPROJECT,
    "README.md": _README,
    ".gitignore": _GITIGNORE,
    "src/{package}/__init__.py": _INIT,
    "src/{package}/functions.py": _FUNCTIONS,
    "tests/test_functions.py": _TESTS,
}
