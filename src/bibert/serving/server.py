"""HTTP serving of a packed model on Starlette + uvicorn (the `serve` extra).

    GET  /health   -> {"status": "ok", "model": ..., "labels": [...], "kernel": "avx512", ...}
    POST /predict  {"texts": ["..."], "pairs": ["..."]}  ("pairs" optional)
                   -> {"labels": [...], "scores": [[p_label0, p_label1, ...], ...]} in input order

Each process has one engine thread that owns the model (the native kernels are driven by
one caller at a time). Requests are checked on the event loop and queued; a prep thread
takes what is queued, waits up to a short window for more while the batch is below
`max_batch` texts and tokenizes it while the engine thread runs the batch before; the
engine runs the batch's texts, sorted by token count, in forwards of up to `engine_batch`
texts (bibert.serving.batching) and hands every request its own slice of the results.
Requests with and without pairs run in separate forwards. A batch that cannot be tokenized is retried request by request, so that
one bad request fails alone.

Errors are JSON {"error": message}: 400 for a body that is not JSON or not of the expected
shape, 404/405 for other routes (no redirects: /predict/ is a 404), 408 for a body that
takes longer than `body_timeout_s`, 413 for too many texts, too long a text or too large a
body, 503 when the queue is full or the server is stopping; the connection's own answers
(bad framing, a slow or large head, too many connections) come from bibert.serving.http.

SIGTERM (or SIGINT) stops accepting connections, answers every request it has read (each
with `Connection: close`), then exits. Requests still unanswered `graceful_timeout` seconds
after the signal are answered 503 and their queued work is dropped, so that the process
exits within about a second more. With several workers the model is loaded (and checked by
one warm-up prediction) in the parent, which then forks the workers: they share its memory
and each starts its own kernel threads (the engine's thread pool is rebuilt after a fork).
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import queue
import signal
import socket
import sys
import threading
import time
import traceback
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from ..errors import BibertError
from .batching import prepare, run
from .http import ConnectionLimits

log = logging.getLogger("bibert.serve")
DRAIN_LIMIT = 64 << 20  # an oversized body up to this size is read (and dropped) before the 413, so the client sees it
SHUTTING_DOWN = "the server is shutting down; retry on another instance or shortly"
CUT_MARGIN_S = 0.5  # after graceful_timeout + this, uvicorn cancels the requests left (still reading a body)
JOIN_TIMEOUT_S = 0.5  # how long shutdown waits for the engine to finish a forward it has begun
BATCH_CHARS = 32 * 1024  # characters a batch takes beside a larger request (see EngineWorker._take)


@dataclass
class ServeSettings:
    """max_batch: most texts in one batch of the engine thread (1: no batching across
    requests). batch_window_ms: how long a batch below max_batch waits for more requests.
    engine_batch: most texts per forward inside a batch. max_texts: texts per request.
    max_text_chars: characters per text (or pair), checked before tokenizing. max_body_bytes:
    request body. body_timeout_s: seconds to receive a body. max_queue: texts waiting for the
    engine before requests are turned away with 503. max_length: tokens per input after
    truncation (default: the model's positions)."""

    max_batch: int = 64
    batch_window_ms: float = 1.0
    engine_batch: int = 32
    max_texts: int = 256
    max_text_chars: int = 100_000
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0
    max_queue: int = 4096
    max_length: int | None = None

    def check(self) -> None:
        for name in ("max_batch", "engine_batch", "max_texts", "max_text_chars", "max_body_bytes", "max_queue"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BibertError(f"{name} is {value!r}: give a positive integer")
        if not (isinstance(self.batch_window_ms, (int, float)) and 0 <= self.batch_window_ms <= 1000):
            raise BibertError(f"batch_window_ms is {self.batch_window_ms!r}: give 0 to 1000 milliseconds")
        if not (isinstance(self.body_timeout_s, (int, float)) and 0 < self.body_timeout_s < math.inf):
            raise BibertError(f"body_timeout_s is {self.body_timeout_s!r}: give a positive number of seconds")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise BibertError(f"max_length is {self.max_length!r}: give a positive number of tokens")


class RequestError(Exception):
    """A request the server refuses: HTTP status and message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ---- the engine thread -----------------------------------------------------------------


class _Job:
    __slots__ = ("texts", "pairs", "future", "loop", "chars")

    def __init__(self, texts, pairs, future, loop):
        self.texts, self.pairs, self.future, self.loop = texts, pairs, future, loop
        self.chars = sum(map(len, texts)) + (sum(map(len, pairs)) if pairs else 0)  # what tokenizing it costs


class EngineWorker:
    """Runs queued requests in batches (see the module's doc) on two threads: "bibert-prep"
    takes a batch of queued requests and tokenizes it while "bibert-engine", the only thread
    that calls the model's forward, runs the batch before it; so tokenizing overlaps the
    forwards, and the prep thread takes the next batch only once the engine has picked up
    the last one (batches stay as large as the queue allows).

    Large requests cannot hold up small ones: a batch takes queued requests in order but
    passes over one that would bring it past BATCH_CHARS characters, and the oldest request,
    once passed over, opens the next batch alone. So a small request waits for at most one
    large one however many are queued, and large ones keep their order among themselves."""

    def __init__(self, model, settings: ServeSettings):
        self.model, self.settings = model, settings
        self._cond = threading.Condition()
        self._queue: deque[_Job] = deque()
        self._queued = 0  # texts in the queue
        self._head_passed = False  # the oldest queued request was passed over by the last batch
        self._closing = False
        self._ready: queue.Queue = queue.Queue(maxsize=1)  # prepared batches, for the engine thread
        self._threads: list[threading.Thread] = []
        self._pending: set[asyncio.Future] = set()  # unsettled futures (touched on the event loop only)
        self.stats = {"requests": 0, "texts": 0, "batches": 0, "forwards": 0}

    def start(self) -> None:
        for target, name in ((self._prep_loop, "bibert-prep"), (self._engine_loop, "bibert-engine")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    @property
    def thread_ids(self) -> dict[str, int]:
        """Linux thread ids of the prep and engine threads ("prep", "engine")."""
        return {t.name.removeprefix("bibert-"): t.native_id for t in self._threads}

    @property
    def alive(self) -> bool:
        return bool(self._threads) and all(t.is_alive() for t in self._threads)

    def submit(self, texts: list[str], pairs: list[str] | None) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._cond:
            if self._closing or not self.alive:
                raise RequestError(503, "the server is shutting down", {"Retry-After": "1", "Connection": "close"})
            if self._queued and self._queued + len(texts) > self.settings.max_queue:
                raise RequestError(503, f"the server is busy ({self._queued} texts waiting); retry shortly",
                                   {"Retry-After": "1"})
            was_empty = not self._queue
            self._queue.append(_Job(texts, pairs, future, loop))
            self._queued += len(texts)
            # wake the prep thread only when it waits for a first request or the batch is full
            # (see _take); in between, the window ends its wait
            if was_empty or self._queued >= self.settings.max_batch:
                self._cond.notify()
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return future

    def cut(self, message: str = SHUTTING_DOWN) -> int:
        """Answer every unsettled request 503 now (on the event loop) and drop its work: its
        queued texts are not prepared, and a prepared batch none of whose requests waits is
        not run. Returns the number of requests cut."""
        cut = [f for f in self._pending if not f.done()]
        for future in cut:
            future.set_exception(RequestError(503, message, {"Retry-After": "1", "Connection": "close"}))
        with self._cond:
            self._drop_settled()
        return len(cut)

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the threads, waiting at most `timeout` seconds in
        all (they are daemon threads: a forward still running does not hold the process)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _drop_settled(self) -> None:
        """Remove queued jobs whose request is already answered (cut, or cancelled); with _cond held."""
        if any(j.future.done() for j in self._queue):
            self._queue = deque(j for j in self._queue if not j.future.done())
            self._queued = sum(len(j.texts) for j in self._queue)

    def _take(self) -> list[_Job] | None:
        """The next batch: once a request is queued, wait up to the window while fewer than
        max_batch texts are queued, then take queued requests in order up to max_batch texts
        (at least one). The requests stay queued during the window, so that `submit` wakes
        this thread only for a first request or a full batch, not for each one."""
        s = self.settings
        with self._cond:
            self._drop_settled()
            while not self._queue:
                if self._closing:
                    return None
                self._cond.wait()
                self._drop_settled()
            deadline = time.monotonic() + s.batch_window_ms / 1000
            while self._queued < s.max_batch and not self._closing:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            self._drop_settled()
            if not self._queue:  # every request that waited was cut
                return []
            return self._fill(s.max_batch)

    def _fill(self, max_texts: int) -> list[_Job]:
        """Takes the batch out of the queue (see the class's doc); with _cond held."""
        head = self._queue[0]
        batch, n, chars = [], 0, 0
        if self._head_passed or head.chars > BATCH_CHARS and all(j.chars > BATCH_CHARS for j in self._queue):
            batch, n, chars = [head], len(head.texts), head.chars  # its turn, or nothing small waits
        for job in self._queue:
            if job is head and batch:
                continue
            if batch and n + len(job.texts) > max_texts:
                break
            if chars + job.chars > BATCH_CHARS:  # passed over: the head's turn comes in the next batch
                continue
            batch.append(job)
            n, chars = n + len(job.texts), chars + job.chars
        taken = set(map(id, batch))
        self._head_passed = id(head) not in taken
        self._queue = deque(j for j in self._queue if id(j) not in taken)
        self._queued -= n
        return batch

    def _prep_loop(self) -> None:
        try:
            while True:
                batch = self._take()
                if batch is None:
                    return
                if not batch:
                    continue
                self.stats["batches"] += 1
                self.stats["requests"] += len(batch)
                self.stats["texts"] += sum(len(j.texts) for j in batch)
                for group in ([j for j in batch if j.pairs is None], [j for j in batch if j.pairs is not None]):
                    for item in self._prepare(group) if group else ():
                        self._ready.put(item)
                        self._ready.join()  # until the engine thread has picked it up
        finally:
            self._ready.put(None)

    def _prepare(self, jobs: list[_Job]) -> list[tuple[list[_Job], object]]:
        """(jobs, Prepared or the exception): the jobs together or, when that fails, each
        alone, so that one bad request fails alone."""
        def one(group):
            texts = [t for j in group for t in j.texts]
            pairs = None if group[0].pairs is None else [p for j in group for p in j.pairs]
            return prepare(self.model, texts, pairs, self.settings.max_length, max_rows=self.settings.engine_batch)

        try:
            return [(jobs, one(jobs))]
        except Exception as exc:
            if len(jobs) == 1:
                return [(jobs, exc)]
        out = []
        for job in jobs:
            try:
                out.append(([job], one([job])))
            except Exception as exc:
                out.append(([job], exc))
        return out

    def _engine_loop(self) -> None:
        while True:
            item = self._ready.get()
            self._ready.task_done()
            if item is None:
                return
            jobs, prepared = item
            if all(j.future.done() for j in jobs):  # cut while it was prepared: nobody waits for it
                continue
            try:
                if isinstance(prepared, BaseException):
                    raise prepared
                labels, scores, forwards = run(self.model, prepared)
                self.stats["forwards"] += forwards
                results = _split(jobs, labels, scores)
            except Exception as exc:  # never leave a request waiting, never let the thread die
                _deliver(jobs, [exc] * len(jobs))
                continue
            _deliver(jobs, results)


def _split(jobs: list[_Job], labels: list, scores: np.ndarray) -> list[tuple[list, list]]:
    """(labels, scores) per job, as JSON-ready lists (scores to 7 digits, NaN as null)."""
    scores = np.round(scores.astype(np.float64), 7)
    if scores.ndim == 1:  # regression: one value per text
        scores = scores[:, None]
    rows = scores.tolist()
    if not np.isfinite(scores).all():  # JSON has no NaN
        rows = [[v if math.isfinite(v) else None for v in row] for row in rows]
        labels = [v if not isinstance(v, float) or math.isfinite(v) else None for v in labels]
    out, s = [], 0
    for job in jobs:
        k = len(job.texts)
        out.append((labels[s:s + k], rows[s:s + k]))
        s += k
    return out


def _deliver(jobs: list[_Job], outcomes: list) -> None:
    """Settles each job's future with its outcome (a result, or an exception to raise), on
    the job's event loop: one hand-off per loop for the whole batch."""
    by_loop: dict = {}
    for job, outcome in zip(jobs, outcomes):
        by_loop.setdefault(job.loop, []).append((job.future, outcome))

    def settle(pairs):
        for future, outcome in pairs:
            if future.done():  # the client went away
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

    for loop, pairs in by_loop.items():
        try:
            loop.call_soon_threadsafe(settle, pairs)
        except RuntimeError:  # the loop is closed
            pass


# ---- requests ----------------------------------------------------------------------------


def _json_type(value) -> str:
    for kind, name in ((bool, "boolean"), (str, "string"), (int, "number"), (float, "number"), (list, "array"),
                       (dict, "object"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _strings(payload: dict, key: str, max_texts: int, max_chars: int) -> list[str]:
    values = payload[key]
    if isinstance(values, str):
        raise RequestError(400, f'"{key}" must be an array of strings; for one text send ["..."]')
    if not isinstance(values, list):
        raise RequestError(400, f'"{key}" must be an array of strings, not a {_json_type(values)}')
    if len(values) > max_texts:
        raise RequestError(413, f'{len(values)} {key} in one request; at most {max_texts}: split the request')
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise RequestError(400, f'"{key}"[{i}] is a {_json_type(value)}, not a string')
        if len(value) > max_chars:
            raise RequestError(413, f'"{key}"[{i}] has {len(value)} characters; at most {max_chars} per text '
                               "(the server's --max-text-chars): send shorter texts")
    try:
        "".join(values).encode("utf-8")
    except UnicodeEncodeError:
        for i, value in enumerate(values):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RequestError(400, f'"{key}"[{i}] holds a lone surrogate escape at character {exc.start}; '
                                   "send valid Unicode") from None
    return values


def parse_predict_body(body: bytes, max_texts: int, max_chars: int = ServeSettings.max_text_chars
                       ) -> tuple[list[str], list[str] | None]:
    """The texts and pairs of a /predict body, or RequestError (400 / 413)."""
    try:
        payload = json.loads(body)
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8 text; send JSON encoded as UTF-8") from None
    except (ValueError, RecursionError) as exc:
        detail = f" ({exc})" if isinstance(exc, json.JSONDecodeError) else ""
        raise RequestError(400, f'the body is not valid JSON{detail}; send {{"texts": ["..."]}}') from None
    if not isinstance(payload, dict):
        raise RequestError(400, f'the body must be a JSON object such as {{"texts": ["..."]}}, not a '
                           f"{_json_type(payload)}")
    unknown = sorted(set(payload) - {"texts", "pairs"})
    if unknown:
        raise RequestError(400, f"unknown field(s) {', '.join(map(json.dumps, unknown))}: the body holds "
                           '"texts" and, optionally, "pairs"')
    if "texts" not in payload:
        raise RequestError(400, 'missing "texts": send {"texts": ["..."]}')
    texts = _strings(payload, "texts", max_texts, max_chars)
    pairs = None
    if payload.get("pairs") is not None:
        pairs = _strings(payload, "pairs", max_texts, max_chars)
        if len(pairs) != len(texts):
            raise RequestError(400, f'{len(texts)} texts but {len(pairs)} pairs: give one pair per text')
    return texts, pairs


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, at most `limit` bytes, else RequestError 413 (after reading and dropping up
    to DRAIN_LIMIT bytes of it, so that the client, still sending, gets the answer); all of
    it within `timeout` seconds, else RequestError 408."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise RequestError(400, f"invalid Content-Length {declared!r}")
        if int(declared) > DRAIN_LIMIT:
            raise RequestError(413, f"the body is {int(declared)} bytes; at most {limit}",
                               {"Connection": "close"})
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    chunks.append(chunk)
                elif size > DRAIN_LIMIT:
                    raise RequestError(413, f"the body is larger than {limit} bytes", {"Connection": "close"})
    except TimeoutError:
        raise RequestError(408, f"the body did not arrive within {timeout:g} s (the server's --body-timeout); "
                           f"{size} bytes came", {"Connection": "close"}) from None
    if size > limit:
        raise RequestError(413, f"the body is {size} bytes; at most {limit}: send fewer or shorter texts")
    return b"".join(chunks)


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def create_app(model, settings: ServeSettings | None = None, name: str | None = None) -> Starlette:
    """The ASGI app for a loaded PackedModel. Its engine thread starts and stops with the
    app's lifespan."""
    from ..packed import kernels

    settings = settings or ServeSettings()
    settings.check()
    worker = EngineWorker(model, settings)
    name = name or Path(getattr(model, "source", "model")).stem

    async def health(request: Request) -> JSONResponse:
        body = {"status": "ok" if worker.alive else "engine stopped", "model": name, "labels": list(model.labels),
                "num_labels": model.num_labels, "kernel": kernels.get_kernel(), "threads": kernels.get_threads(),
                "pid": os.getpid(), "max_length": settings.max_length or model.max_positions,
                "limits": {"max_texts": settings.max_texts, "max_text_chars": settings.max_text_chars,
                           "max_body_bytes": settings.max_body_bytes},
                "batching": {"max_batch": settings.max_batch, "window_ms": settings.batch_window_ms},
                "served": dict(worker.stats),
                # Linux thread ids, for per-thread CPU accounting from /proc (benchmarks/serve_load.py)
                "thread_ids": {"event_loop": threading.get_native_id(), **worker.thread_ids}}
        return JSONResponse(body, status_code=200 if worker.alive else 503)

    async def predict(request: Request) -> JSONResponse:
        try:
            body = await _read_body(request, settings.max_body_bytes, settings.body_timeout_s)
            texts, pairs = parse_predict_body(body, settings.max_texts, settings.max_text_chars)
            if not texts:
                return JSONResponse({"labels": [], "scores": []})
            labels, scores = await worker.submit(texts, pairs)
        except RequestError as exc:
            return _error(exc.status, exc.message, exc.headers)
        except BibertError as exc:  # the engine refused these inputs
            return _error(400, str(exc))
        except ClientDisconnect:
            client = request.client
            log.info("%s went away before sending the whole body", f"{client.host}:{client.port}" if client else
                     "a client")
            return _error(400, "the client went away")  # written nowhere
        except asyncio.CancelledError:  # shutdown's last resort (graceful_timeout passed): answer, then end
            asyncio.current_task().uncancel()
            return _error(503, SHUTTING_DOWN, {"Retry-After": "1", "Connection": "close"})
        except Exception:
            log.error("prediction failed:\n%s", traceback.format_exc())
            return _error(500, "internal error: the prediction failed; see the server's log")
        return JSONResponse({"labels": labels, "scores": scores})

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = {404: f"no route {request.url.path}: use GET /health or POST /predict",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return _error(exc.status_code, message, getattr(exc, "headers", None))

    @asynccontextmanager
    async def lifespan(app):
        worker.start()
        try:
            yield
        finally:
            worker.close(JOIN_TIMEOUT_S)

    app = Starlette(routes=[Route("/health", health, methods=["GET"]), Route("/predict", predict, methods=["POST"])],
                    exception_handlers={HTTPException: http_error}, lifespan=lifespan)
    app.router.redirect_slashes = False  # /predict/ is a 404, not a redirect built from the Host header
    app.state.worker = worker
    return app


# ---- processes ---------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise BibertError(f"port {port!r}: give 0 to 65535 (0 picks a free port)")
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BibertError(f"cannot resolve host {host!r} ({exc.strerror}); give an address such as 127.0.0.1") from None
    family, kind, proto, _, address = info[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise BibertError(f"cannot listen on {host}:{port} ({exc.strerror}); is another server there? choose "
                          "another --port") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _graceful_server(config, worker: EngineWorker, limits, graceful_timeout: float):
    """A uvicorn.Server whose shutdown (1) accepts the connections waiting in the listening
    socket's backlog, whose clients may have sent a request already, (2) lets every
    connection answer what it has read (bibert.serving.http), and (3) answers 503 to every
    request still waiting for the engine `graceful_timeout` seconds after it began."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            limits.stopping = True
            loop = asyncio.get_running_loop()
            accepted = []
            for sock in sockets or ():  # take the backlog and close the listener, with no await between
                while True:
                    try:
                        conn, _ = sock.accept()
                    except OSError:  # none waiting (BlockingIOError), or the socket is gone
                        break
                    conn.setblocking(False)
                    accepted.append(conn)
            for server in self.servers:
                server.close()
            for sock in sockets or ():
                sock.close()
            cut = loop.call_later(graceful_timeout, self._cut)
            await asyncio.gather(*(loop.connect_accepted_socket(self._protocol, conn) for conn in accepted),
                                 return_exceptions=True)
            try:
                await super().shutdown(sockets)
            finally:
                cut.cancel()

        def _protocol(self):
            return self.config.http_protocol_class(config=self.config, server_state=self.server_state,
                                                   app_state=self.lifespan.state)

        def _cut(self) -> None:
            n = worker.cut()
            if n:
                log.warning("graceful timeout (%g s): %d request(s) answered 503, their work dropped",
                            graceful_timeout, n)

    return GracefulServer(config)


def _run_server(model, sock: socket.socket, settings: ServeSettings, name: str, graceful_timeout: float,
                log_level: str, access_log: bool, limits) -> int:
    """Serve on `sock` in this process until SIGTERM / SIGINT."""
    import copy
    import dataclasses
    import functools

    import uvicorn

    from .http import LimitedHttpProtocol

    limits = dataclasses.replace(limits)  # this server's: shutdown sets its `stopping`
    app = create_app(model, settings, name)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)  # bibert.serve's lines beside uvicorn's
    log_config["loggers"][log.name] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    config = uvicorn.Config(app, lifespan="on", log_level=log_level, log_config=log_config, access_log=access_log,
                            ws="none", http=functools.partial(LimitedHttpProtocol, limits=limits),
                            timeout_keep_alive=limits.keep_alive_timeout,
                            timeout_graceful_shutdown=graceful_timeout + CUT_MARGIN_S, server_header=False)
    server = _graceful_server(config, app.state.worker, limits, graceful_timeout)
    # uvicorn raises the signal it stopped for again once it has shut down gracefully: a
    # handler here makes that a clean exit rather than death by SIGTERM
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    try:
        server.run(sockets=[sock])
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 1


def serve(model_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, workers: int = 1,
          threads: int | None = None, kernel: str | None = None, settings: ServeSettings | None = None,
          graceful_timeout: float = 30.0, log_level: str = "info", access_log: bool = False,
          limits: ConnectionLimits | None = None) -> int:
    """Load the model, check it with one prediction, listen on host:port and serve until
    SIGTERM or SIGINT. workers > 1: that many forked processes share the socket and the
    loaded model. threads: kernel threads per process (default: BIBERT_THREADS, else the
    cores divided among the workers). limits: the connections' (bibert.serving.http).
    Prints one line with the address once listening."""
    from ..packed import kernels, load_packed

    settings = settings or ServeSettings()
    settings.check()
    limits = limits or ConnectionLimits()
    limits.check()
    if isinstance(graceful_timeout, bool) or not isinstance(graceful_timeout, (int, float)) \
            or not 0 <= graceful_timeout < math.inf:
        raise BibertError(f"graceful timeout {graceful_timeout!r}: give 0 or more seconds")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise BibertError(f"workers is {workers!r}: give a positive number of processes")
    if workers > 1 and not hasattr(os, "fork"):
        raise BibertError("several workers need fork(), which this platform lacks; run one worker per "
                          "process behind a load balancer instead")
    if threads is None and not os.environ.get("BIBERT_THREADS"):
        kernels.lib()
        threads = max(1, kernels.default_threads() // workers)
    if workers > 1:  # the processes are the parallelism; the tokenizer's own threads would not survive the fork
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model = load_packed(model_path, threads=threads, kernel=kernel)
    model.predict(["warm up"], max_length=settings.max_length)  # tokenizer and kernels work before any request
    name = Path(model_path).stem
    sock = _bind(host, port)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if sock.family == socket.AF_INET6 else bound[0]
    print(f"bibert serve: {name} ({', '.join(map(str, model.labels))}) on http://{shown}:{bound[1]} with "
          f"{workers} worker(s) x {kernels.get_threads()} thread(s), kernel {kernels.get_kernel()}",
          file=sys.stderr, flush=True)
    args = (settings, name, graceful_timeout, log_level, access_log, limits)
    try:
        if workers == 1:
            return _run_server(model, sock, *args)
        return _supervise(model, sock, workers, args)
    finally:
        sock.close()


def _supervise(model, sock: socket.socket, workers: int, args: tuple) -> int:
    """Fork `workers` servers on the shared socket; replace one that dies; on SIGTERM or
    SIGINT pass SIGTERM on and wait for all of them."""
    children: dict[int, int] = {}
    stopping = False
    deaths: deque[float] = deque(maxlen=5)

    def spawn(slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker: never returns into the parent's code
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = _run_server(model, sock, *args)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = slot

    def stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        sock.close()  # the listener closes once the workers have closed their copies too

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    code = 0
    try:
        for slot in range(workers):
            spawn(slot)
        while children:
            try:
                pid, status = os.wait()
            except ChildProcessError:
                break
            slot = children.pop(pid, None)
            if slot is None or stopping:
                continue
            deaths.append(time.monotonic())
            log.error("worker %d exited (status %d); starting another", pid, status)
            if len(deaths) == deaths.maxlen and deaths[-1] - deaths[0] < 60:
                log.error("workers keep exiting (5 within a minute); stopping")
                code = 1
                stop(signal.SIGTERM, None)
                continue
            spawn(slot)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code
