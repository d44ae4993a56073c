"""The HTTP server, started for real on 127.0.0.1 with an ephemeral port: health, predictions
equal to the engine's, bad requests answered 4xx with a message, concurrent requests
batched together, forked workers (and the engine after a fork), graceful SIGTERM."""
from __future__ import annotations

import http.client
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from bibert.cli import main as cli_main  # noqa: E402
from bibert.packed import export_packed, load_packed  # noqa: E402
from test_packed import make_student  # noqa: E402

TEXTS = ["the movie was good", "a very dull plot and a bad ending", "fun", "", "café — 日本語 🎬 naïve",
         "not very fun and not very great and a boring story " * 4, 'quotes " and \\ backslashes', "ok"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    _, folder = make_student(tmp)
    out = tmp / "tiny.bibert"
    export_packed(folder, out)
    return out


@pytest.fixture(scope="module")
def engine(model_file):
    return load_packed(model_file)


class Server:
    """`bibert serve` in a child process on port 0; the port is read from its first line."""

    def __init__(self, model_file, *extra: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bibert.cli", "serve", "--model", str(model_file), "--host", "127.0.0.1",
             "--port", "0", "--log-level", "warning", *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        found = threading.Event()

        def drain():
            for line in self.proc.stderr:
                self.lines.append(line)
                if "on http://" in line:
                    found.set()

        threading.Thread(target=drain, daemon=True).start()
        if not found.wait(90):
            self.proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.port = int(re.search(r"http://127\.0\.0\.1:(\d+)", "".join(self.lines)).group(1))
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError("the server is not healthy:\n" + "".join(self.lines))
            time.sleep(0.1)

    def request(self, method: str, path: str, body=None, headers=None, timeout=30):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        return resp.status, (json.loads(data) if data else None)

    def get(self, path):
        return self.request("GET", path)

    def predict(self, body, **kw):
        return self.request("POST", "/predict", body, {"Content-Type": "application/json"}, **kw)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(model_file):
    s = Server(model_file, "--batch-window-ms", "20", "--max-texts", "16", "--max-body-kb", "64")
    yield s
    s.stop()


def expected(engine, texts, pairs=None):
    pred = engine.predict(texts, pairs=pairs)
    return pred.labels, pred.scores


def check(engine, body, answer, pairs=None):
    labels, scores = expected(engine, body["texts"], body.get("pairs"))
    assert answer["labels"] == labels
    np.testing.assert_allclose(np.array(answer["scores"]), scores, rtol=1e-5, atol=1e-6)


def test_health(server, engine):
    status, body = server.get("/health")
    assert status == 200 and body["status"] == "ok"
    assert body["model"] == "tiny" and body["labels"] == engine.labels
    assert body["kernel"] in ("avx512", "avx2", "portable")
    ids = body["thread_ids"]  # threads of the serving process, for per-thread CPU accounting
    assert set(ids) == {"event_loop", "prep", "engine"} and len(set(ids.values())) == 3
    if sys.platform == "linux":
        assert all(os.path.isdir(f"/proc/{body['pid']}/task/{tid}") for tid in ids.values())


def test_predict_in_input_order_with_pairs(server, engine):
    body = {"texts": TEXTS}
    status, answer = server.predict(body)
    assert status == 200
    check(engine, body, answer)
    body = {"texts": TEXTS[:3], "pairs": ["fun", "", "a bad ending"]}
    status, answer = server.predict(body)
    assert status == 200
    check(engine, body, answer)
    assert server.predict({"texts": []}) == (200, {"labels": [], "scores": []})
    assert server.predict({"texts": ["x"], "pairs": None})[0] == 200


BAD = [
    (b'{"texts": ["a"', 400, "not valid JSON"),
    (b"", 400, "not valid JSON"),
    (b"\xff\xfe\x00garbage", 400, "JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (b'"texts"', 400, "JSON object"),
    (b'{"text": ["a"]}', 400, 'unknown field'),
    (b'{"pairs": ["a"]}', 400, 'missing "texts"'),
    (b'{"texts": "a"}', 400, "array of strings"),
    (b'{"texts": {"a": 1}}', 400, "array of strings"),
    (b'{"texts": ["a", 3]}', 400, '"texts"\\[1\\] is a number'),
    (b'{"texts": [null]}', 400, "null"),
    (b'{"texts": ["a"], "pairs": ["b", "c"]}', 400, "1 texts but 2 pairs"),
    (b'{"texts": ["a"], "pairs": [1]}', 400, '"pairs"\\[0\\]'),
    (b'{"texts": ["\\ud800"]}', 400, "lone surrogate"),
    (b"[" * 60000, 400, "not valid JSON"),  # nested deeper than the parser goes
    (b'{"texts": [' + b'"a",' * 16 + b'"a"]}', 413, "at most 16"),
    (b'{"texts": ["' + b"a" * 70000 + b'"]}', 413, "at most 65536"),
]


@pytest.mark.parametrize("body, status, message", BAD)
def test_bad_requests_are_4xx_with_a_message(server, body, status, message):
    got, answer = server.predict(body)
    assert got == status and re.search(message, answer["error"]), answer


def test_bad_routes_and_a_chunked_oversized_body(server):
    status, answer = server.get("/predict")
    assert status == 405 and "GET" in answer["error"]
    status, answer = server.get("/nowhere")
    assert status == 404 and "/predict" in answer["error"]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/predict", body=iter([b'{"texts": ["', b"a" * 40000, b"a" * 40000, b'"]}']),
                 encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and "at most 65536" in json.loads(resp.read())["error"]
    conn.close()
    assert server.get("/health")[0] == 200


def test_concurrent_requests_are_batched_and_answered_in_order(server, engine):
    rng = random.Random(0)
    bodies = []
    for _ in range(96):
        texts = rng.sample(TEXTS, rng.randint(1, 5))
        body = {"texts": texts}
        if rng.random() < 0.3:
            body["pairs"] = [rng.choice(TEXTS) for _ in texts]
        bodies.append(body)
    before = server.get("/health")[1]["served"]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(server.predict, bodies))
    for body, (status, answer) in zip(bodies, answers):
        assert status == 200
        check(engine, body, answer)
    served = server.get("/health")[1]["served"]
    requests = served["requests"] - before["requests"]
    batches = served["batches"] - before["batches"]
    assert requests == len(bodies) and batches < requests  # some requests ran together


def test_engine_after_fork(model_file):
    """The engine's thread pool, started in the parent, is rebuilt in a forked child."""
    engine = load_packed(model_file, threads=2)
    want = engine.predict(TEXTS).scores  # the pool runs in this process now
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if np.array_equal(engine.predict(TEXTS).scores, want) else 3
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def slow_request(port: int, body: dict, first_part: float = 0.5):
    """Sends part of a request body, then waits for the caller's go before the rest: a
    request in flight. Returns (go event, thread, result dict)."""
    data = json.dumps(body).encode()
    cut = int(len(data) * first_part)
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data[:cut])
    go, result = threading.Event(), {}

    def finish():
        go.wait(30)
        sock.sendall(data[cut:])
        raw = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
            head, _, rest = raw.partition(b"\r\n\r\n")
            m = re.search(rb"content-length: (\d+)", head, re.I)
            if m and len(rest) >= int(m.group(1)):
                break
        sock.close()
        head, _, rest = raw.partition(b"\r\n\r\n")
        result["status"] = int(head.split()[1])
        result["body"] = json.loads(rest)

    thread = threading.Thread(target=finish)
    thread.start()
    return go, thread, result


def test_workers_share_the_socket_restart_and_stop(model_file, engine):
    s = Server(model_file, "--workers", "2", "--threads", "2")
    try:
        pids = set()
        for _ in range(20):
            with ThreadPoolExecutor(8) as pool:
                pids |= {body["pid"] for _, body in pool.map(lambda _: s.get("/health"), range(16))}
            if len(pids) == 2:
                break
        assert len(pids) == 2
        body = {"texts": TEXTS}
        with ThreadPoolExecutor(8) as pool:
            for status, answer in pool.map(s.predict, [body] * 16):
                assert status == 200
                check(engine, body, answer)
        victim = pids.pop()
        os.kill(victim, signal.SIGKILL)  # the parent starts another worker
        deadline = time.monotonic() + 60
        seen = set()
        while time.monotonic() < deadline and not (seen - pids - {victim}):
            with ThreadPoolExecutor(8) as pool:
                seen |= {b["pid"] for st, b in pool.map(lambda _: s.get("/health"), range(16)) if st == 200}
        assert seen - pids - {victim}, "no replacement worker answered"
        go, thread, result = slow_request(s.port, {"texts": TEXTS})
        time.sleep(0.3)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        go.set()
        thread.join(30)
        assert result["status"] == 200
        check(engine, {"texts": TEXTS}, result["body"])
        assert s.proc.wait(30) == 0
    finally:
        s.stop()


def test_cli_errors():
    assert cli_main(["serve", "--model", "/nonexistent/model.bibert", "--port", "0"]) == 2
    assert cli_main(["serve", "--model", "x.bibert", "--workers", "0"]) == 2


def test_sigterm_finishes_requests_in_flight(server, engine):
    """Last in this file: stops the module's server."""
    go, thread, result = slow_request(server.port, {"texts": TEXTS[:4]})
    time.sleep(0.3)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.proc.poll() is None  # waiting for the request
    go.set()
    thread.join(30)
    assert result["status"] == 200
    check(engine, {"texts": TEXTS[:4]}, result["body"])
    assert server.proc.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=5).close()


def test_batches_wait_out_the_window_unless_full():
    """The prep thread's batch: a request alone waits the window for company; enough queued
    texts end the wait at once; a batch takes whole requests up to max_batch texts."""
    import asyncio

    from bibert.serving.server import EngineWorker, ServeSettings

    worker = EngineWorker(None, ServeSettings(max_batch=5, batch_window_ms=200))
    worker._threads = [threading.current_thread()]  # "alive", without starting its threads

    async def scenario():
        worker.submit(["a", "b"], None)
        t = time.monotonic()
        assert [len(j.texts) for j in worker._take()] == [2]  # alone: waited the window
        waited = time.monotonic() - t
        for k in (2, 2, 2, 1):
            worker.submit(["x"] * k, None)
        t = time.monotonic()
        first = worker._take()  # 7 texts queued >= 5: no wait; 2 + 2, as a third request would pass 5
        fast = time.monotonic() - t
        second = worker._take()  # 2 + 1 = 3 < 5: waits the window again
        return waited, fast, [len(j.texts) for j in first], [len(j.texts) for j in second]

    waited, fast, first, second = asyncio.run(scenario())
    assert waited >= 0.19 and fast < 0.1
    assert first == [2, 2] and second == [2, 1] and worker._queued == 0
