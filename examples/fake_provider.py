"""A stand-in for Salesforce and GitHub on 127.0.0.1, for the README's tour and for trying plugins.

    python examples/fake_provider.py            # listens on 127.0.0.1:8089

- ``POST /salesforce/<instance>/webhooks`` registers a webhook and answers ``{"id": "wh_N"}``;
  ``DELETE /salesforce/<instance>/webhooks/<id>`` deletes it (404 when it is already gone).
- ``GET /github/user`` answers like GitHub: the token's scopes in ``X-OAuth-Scopes``. A token
  ``ghp_full...`` has ``repo, read:org``; any other has ``repo`` only.

Every request is printed, with its ``traceparent`` when it has one.
"""

from __future__ import annotations

import itertools
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WEBHOOKS: dict[str, dict[str, object]] = {}
IDS = itertools.count(1)


class Handler(BaseHTTPRequestHandler):
    """Routes the few endpoints the example plugins call."""

    def log_message(self, format: str, *args: object) -> None:
        trace = self.headers.get("traceparent")
        print(
            f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}"
            + (f"  traceparent={trace}" if trace else "")
        )
        sys.stdout.flush()

    def _reply(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path.startswith("/salesforce/") and self.path.endswith("/webhooks"):
            webhook_id = f"wh_{next(IDS)}"
            WEBHOOKS[webhook_id] = body
            self._reply(201, {"id": webhook_id})
        else:
            self._reply(404, {"message": "not found"})

    def do_DELETE(self) -> None:
        webhook_id = self.path.rsplit("/", 1)[-1]
        if self.path.startswith("/salesforce/") and WEBHOOKS.pop(webhook_id, None) is not None:
            self._reply(204, {})
        else:
            self._reply(404, {"message": f"webhook {webhook_id} not found"})

    def do_GET(self) -> None:
        if self.path == "/github/user":
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            scopes = "repo, read:org" if token.startswith("ghp_full") else "repo"
            self._reply(200, {"login": "octocat"}, {"X-OAuth-Scopes": scopes})
        else:
            self._reply(404, {"message": "not found"})


def main() -> None:
    """Serve until interrupted."""
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 8089
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    print(f"fake provider on http://127.0.0.1:{port}")
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
