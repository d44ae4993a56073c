"""The server's HTTP/1.1 connections: uvicorn's httptools protocol with limits and a
shutdown that drops no request.

What it adds to uvicorn's protocol, everything the app never sees:

- a request head (request line and headers) must arrive whole within `header_timeout`
  seconds of the connection opening or of the previous response; a connection that sent
  nothing by then is closed, one that sent part of a head is answered 408;
- a head larger than `max_head_bytes` is answered 431 as soon as that many bytes came;
- beyond `max_connections` open connections, a new one is answered 503 and closed;
- bad framing (a malformed request line, header or Content-Length) is answered 400;
- on shutdown, an idle keep-alive connection stays open `SHUTDOWN_GRACE_S` longer, so
  that a request its client sent just before is still read and answered; every request
  read from then on is answered with `Connection: close`.

Each of these answers is JSON, {"error": message}, like the app's, and is logged in one
line at INFO. Left out: HTTP/2, WebSockets (the server has no WebSocket route).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from ..errors import BibertError

log = logging.getLogger("bibert.serve")
SHUTDOWN_GRACE_S = 0.2  # how long an idle connection stays open once shutdown begins


@dataclass
class ConnectionLimits:
    """header_timeout: seconds to receive a request head. keep_alive_timeout: seconds an idle
    connection stays open after a response (uvicorn's timeout_keep_alive). max_head_bytes:
    request line and headers. max_connections: open connections per process. stopping: set
    by the server when it shuts down (connections from then on are answered, then closed)."""

    header_timeout: float = 10.0
    keep_alive_timeout: float = 5.0
    max_head_bytes: int = 64 << 10
    max_connections: int = 1000
    stopping: bool = False

    def check(self) -> None:
        for name in ("header_timeout", "keep_alive_timeout"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise BibertError(f"{name} is {value!r}: give a positive number of seconds")
        for name in ("max_head_bytes", "max_connections"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BibertError(f"{name} is {value!r}: give a positive integer")


class _HeadTooLarge(Exception):
    pass


class LimitedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above; `limits` is shared by every
    connection of the server."""

    def __init__(self, config, server_state, app_state, _loop=None, *, limits: ConnectionLimits):
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self.reading_head = True  # between a request's end (or the connection's start) and its headers' end
        self.head_bytes = 0  # bytes of the head being read
        self.head_timer: asyncio.TimerHandle | None = None

    # ---- uvicorn's protocol, extended

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self.refuse(503, f"too many connections (at most {self.limits.max_connections}); retry shortly",
                        {"Retry-After": "1"})
            return
        self.wait_for_head()
        if self.limits.stopping:  # accepted during shutdown: a request already sent is answered
            self.shutdown()

    def connection_lost(self, exc) -> None:
        self.cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._unset_keepalive_if_required()
        if self.reading_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._unsupported_upgrade_warning()
        except httptools.HttpParserError as exc:
            cause = exc.__context__ if isinstance(exc, httptools.HttpParserCallbackError) else exc
            if isinstance(cause, _HeadTooLarge):
                self.refuse_large_head()
            else:
                self.refuse(400, f"malformed HTTP request ({cause}); send a valid HTTP/1.1 request")
        else:
            if self.reading_head and self.head_bytes > self.limits.max_head_bytes:
                self.refuse_large_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.reading_head = True

    def on_headers_complete(self) -> None:
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_head_bytes:
            raise _HeadTooLarge
        self.reading_head, self.head_bytes = False, 0
        self.cancel_head_timer()
        super().on_headers_complete()
        if self.limits.stopping:
            self.cycle.keep_alive = False

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.reading_head = True  # the next request's head may follow at once (pipelining)

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # a next request, already read, starts now
        super().on_response_complete()
        if not self.transport.is_closing() and not pipelined:
            self.wait_for_head()

    def shutdown(self) -> None:
        """Called by the server once it stops listening: a request in flight is answered with
        `Connection: close`; an idle connection gets SHUTDOWN_GRACE_S to deliver a request
        its client has already sent."""
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        elif not self.head_bytes:
            self.loop.call_later(SHUTDOWN_GRACE_S, self.close_if_idle)

    def send_400_response(self, msg: str) -> None:  # uvicorn's, for errors it finds itself
        self.refuse(400, msg)

    # ---- ours

    def wait_for_head(self) -> None:
        self.cancel_head_timer()
        self.head_timer = self.loop.call_later(self.limits.header_timeout, self.head_timed_out)

    def cancel_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None

    def head_timed_out(self) -> None:
        self.head_timer = None
        if self.transport.is_closing():
            return
        if self.head_bytes:
            self.refuse(408, f"the request head did not arrive within {self.limits.header_timeout:g} s")
        else:  # nothing sent: an idle connection
            self.transport.close()

    def close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.head_bytes \
                and not self.transport.is_closing():
            self.transport.close()

    def refuse_large_head(self) -> None:
        self.refuse(431, f"the request head (request line and headers) is larger than {self.limits.max_head_bytes} "
                    "bytes; send fewer or shorter headers")

    def refuse(self, status: int, message: str, headers: dict | None = None) -> None:
        """Answer `status` with a JSON error and close, unless a response already started."""
        self.cancel_head_timer()
        if self.transport.is_closing():
            return
        client = "%s:%d" % self.client if self.client else "a client"
        log.info("%s: %d %s", client, status, message)
        if self.cycle is None or not self.cycle.response_started:
            body = json.dumps({"error": message}).encode()
            head = [STATUS_LINE[status]]
            for name, value in self.server_state.default_headers:
                head += [name, b": ", value, b"\r\n"]
            for name, value in (headers or {}).items():
                head.append(f"{name}: {value}\r\n".encode("latin-1"))
            head.append(b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                        % len(body))
            self.transport.write(b"".join(head) + body)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's answer, if any, goes nowhere
            self.cycle.message_event.set()
        self.transport.close()
