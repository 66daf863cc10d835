"""An HTTP proxy that forwards to a real server, or answers errors when told to.

Used to make the local S3 (moto) answer a burst of 500s, as a real S3 does
under trouble, without touching moto itself.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from http.server import BaseHTTPRequestHandler
from typing import Self

import requests

from tests.support.httpserver import local_http_server

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host"}
S3_500 = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>"
)


class FaultProxy:
    """Forwards every request to ``upstream`` unless a fault is armed."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.lock = threading.Lock()
        self.fail_remaining = 0
        self.failed = 0
        self.forwarded = 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if proxy.take_fault():
                    self._answer(500, {"Content-Type": "application/xml"}, S3_500)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                answer = requests.request(self.command, proxy.upstream + self.path,
                                          headers=headers, data=body, timeout=30)  # fmt: skip
                out = {k: v for k, v in answer.headers.items() if k.lower() not in HOP_BY_HOP}
                self._answer(answer.status_code, out, answer.content)

            def _answer(self, status: int, headers: dict[str, str], body: bytes) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle  # noqa: N815

            def log_message(self, *_: object) -> None:
                pass

        self.handler = Handler
        self.stack = ExitStack()
        self.url = ""

    def take_fault(self) -> bool:
        """Consume one armed fault; False means forward."""
        with self.lock:
            if self.fail_remaining > 0:
                self.fail_remaining -= 1
                self.failed += 1
                return True
            self.forwarded += 1
            return False

    def fail_next(self, count: int) -> None:
        """Answer the next ``count`` requests with an S3 500 InternalError."""
        with self.lock:
            self.fail_remaining = count

    def __enter__(self) -> Self:
        self.url = self.stack.enter_context(local_http_server(self.handler))
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stack.close()
