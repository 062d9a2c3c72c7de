"""The web console: server-rendered pages over the daemon's own service, in the daemon's own event loop.

``orchestrator serve`` serves it on ``--web-listen`` (127.0.0.1:50080 by
default; an empty value turns it off). Its pages ask the same
:class:`~orchestrator.service.Service` the gRPC server asks, never a store;
only the daemon imports this package (an import-linter contract says so).

- :mod:`orchestrator.console._app`: the aiohttp application, its life (:class:`Console`), TLS, the error table;
- :mod:`orchestrator.console._pages`: one handler per page, form and stream;
- :mod:`orchestrator.console._views`: what each page shows, from the service's answers (pure);
- :mod:`orchestrator.console._session`: the session cookie, login, CSRF tokens;
- ``templates/`` (Jinja2) and ``static/`` (the one script and style sheet, served from memory).

docs/console.md describes the pages, access and the live tail.
"""

from __future__ import annotations

from orchestrator.console._app import Console, tls_context

__all__ = ["Console", "tls_context"]
