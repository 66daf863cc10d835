"""A local fake of Bedrock's Converse API (``POST /model/{id}/converse``).

botocore talks to it through ``endpoint_url``; it records every request body so
tests can read exactly what would have left the site.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler
from typing import Any, Self

from tests.support.httpserver import local_http_server

ANSWER: dict[str, Any] = {
    "output": {
        "message": {"role": "assistant", "content": [{"text": "FINDINGS: ...\nIMPRESSION: ..."}]}
    },
    "stopReason": "end_turn",
    "usage": {"inputTokens": 321, "outputTokens": 45, "totalTokens": 366},
    "metrics": {"latencyMs": 900},
}


class FakeConverse:
    """Answers ``answer`` (or ``status`` with a ServiceUnavailable error) and records bodies."""

    def __init__(self, answer: dict[str, Any] | None = None) -> None:
        self.answer = answer or ANSWER
        self.status = 200
        self.bodies: list[bytes] = []
        self.paths: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                fake.paths.append(self.path)
                fake.bodies.append(self.rfile.read(int(self.headers["Content-Length"])))
                ok = fake.status == 200
                out = json.dumps(fake.answer if ok else {"message": "Service unavailable"})
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                if not ok:
                    self.send_header("x-amzn-ErrorType", "ServiceUnavailableException")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out.encode())

            def log_message(self, *_: object) -> None:
                pass

        self.handler = Handler
        self.stack = ExitStack()
        self.url = ""

    def __enter__(self) -> Self:
        self.url = self.stack.enter_context(local_http_server(self.handler))
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stack.close()
