"""What a hostile or careless client can do to `bibert serve` (issue 28), and what held.

Each scenario starts its own server on 127.0.0.1 (a packed model of --shape, random
weights) and prints one verdict line with its numbers:

- slow: --clients normal keep-alive clients (GET /health and POST /predict alternately) for
  --seconds alone, then beside --slow half-open connections that send a request head one
  byte a second: the normal clients' p50 / p99 and failures both ways, and when the server
  closed the slow connections (the --header-timeout, 10 s by default);
- huge: --clients clients sending 1 MB texts, then texts at the --max-text-chars cap, beside
  one normal client: its p99 and what the big ones were answered;
- disconnects: --disconnects clients that send half a body and hang up, with a /health
  probe: the server's log lines per disconnect, the probe's worst latency;
- header: a 100 MB header block: how soon it is refused (431), /health meanwhile;
- sigterm: SIGTERM under --clients keep-alive clients, --runs times with 1 and with 2
  workers: requests sent while the listener was open that got no complete answer, and the
  time to exit;
- graceful: --graceful-timeout 1 with 48 heavy requests in flight: the time to exit and the
  answers (200 or JSON 503).

    python benchmarks/serve_attack.py                       # every scenario, MiniLM shape
    python benchmarks/serve_attack.py --only slow sigterm --runs 10
Prints only (nothing is written under benchmarks/results).
"""
from __future__ import annotations

import argparse
import collections
import http.client
import json
import select
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_predict_throughput import SHAPES, build_model, cpu_name, mixed_texts  # noqa: E402
from serve_load import percentile, start_server  # noqa: E402

SCENARIOS = ("slow", "huge", "disconnects", "header", "sigterm", "graceful")


def call(port: int, method: str, path: str, body: bytes | None = None, conn=None, timeout: float = 30):
    """(status, JSON answer, seconds) of one request, on `conn` (kept alive) or a new connection."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t = time.perf_counter()
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"} if body else {})
        resp = conn.getresponse()
        data = resp.read()
        return resp.status, json.loads(data) if data else None, time.perf_counter() - t
    finally:
        if own:
            conn.close()


class NormalClients:
    """`n` keep-alive clients sending GET /health and POST /predict (one text) in turn."""

    def __init__(self, port: int, n: int, texts: list[str]):
        self.port, self.texts, self.stop = port, texts, threading.Event()
        self.latency = {"health": [], "predict": []}
        self.failures: list[str] = []
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(n)]
        for t in self.threads:
            t.start()

    def run(self, i: int) -> None:
        conn, k = None, i
        while not self.stop.is_set():
            k += 1
            conn = conn or http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            try:
                if k % 2:
                    status, _, dt = call(self.port, "GET", "/health", conn=conn)
                    kind = "health"
                else:
                    body = json.dumps({"texts": [self.texts[k % len(self.texts)]]}).encode()
                    status, _, dt = call(self.port, "POST", "/predict", body, conn=conn)
                    kind = "predict"
                if status != 200:
                    self.failures.append(f"{kind} {status}")
                self.latency[kind].append(dt)
            except (OSError, http.client.HTTPException, ValueError) as exc:
                self.failures.append(repr(exc))
                conn.close()
                conn = None

    def finish(self) -> dict:
        self.stop.set()
        for t in self.threads:
            t.join(60)
        return {kind: {"n": len(xs), "p50_ms": 1e3 * percentile(xs, 50), "p99_ms": 1e3 * percentile(xs, 99)}
                for kind, xs in self.latency.items() if xs} | {"failures": len(self.failures)}


def scenario_slow(model: Path, args) -> str:
    proc, port, _ = start_server(model, args.threads, [])
    try:
        alone = NormalClients(port, args.clients, args.texts)  # the same clients without the slow ones, first
        time.sleep(args.seconds)
        alone = alone.finish()
        socks, opened, closed_after = [], {}, []
        for _ in range(args.slow):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\n")
            s.setblocking(False)
            socks.append(s)
            opened[s] = time.monotonic()
        normal = NormalClients(port, args.clients, args.texts)
        end = time.monotonic() + args.seconds
        while time.monotonic() < end:
            live = [s for s in socks if s.fileno() >= 0]
            readable, _, _ = select.select(live, [], [], 1.0)
            for s in readable:  # an answer (408) or the close
                try:
                    data = s.recv(65536)
                except OSError:
                    data = b""
                if not data or b"\r\n\r\n" in data:
                    closed_after.append(time.monotonic() - opened[s])
                    s.close()
            for s in live:
                if s.fileno() >= 0:
                    try:
                        s.send(b"X")  # one more byte of a header that never ends
                    except OSError:
                        pass
        stats = normal.finish()
        for s in socks:
            s.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    closed = f"{len(closed_after)}/{args.slow} closed by the server" + (
        f" after {min(closed_after):.1f}-{max(closed_after):.1f} s" if closed_after else "")
    def shown(st):
        return (f"health p50/p99 {st['health']['p50_ms']:.1f}/{st['health']['p99_ms']:.1f} ms, predict p50/p99 "
                f"{st['predict']['p50_ms']:.1f}/{st['predict']['p99_ms']:.1f} ms "
                f"({st['health']['n'] + st['predict']['n']} requests, {st['failures']} failed)")

    return (f"slow: {args.clients} clients for {args.seconds:g} s alone: {shown(alone)}; beside {args.slow} slow "
            f"connections: {shown(stats)}; {closed}")


def scenario_huge(model: Path, args) -> str:
    proc, port, _ = start_server(model, args.threads, [])
    out = []
    try:
        for label, text in (("1 MB texts", "a " * 500_000), ("100k-character texts", "a " * 50_000)):
            body = json.dumps({"texts": [text]}).encode()
            stop, answers = threading.Event(), {}

            def big():
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
                while not stop.is_set():
                    try:
                        status, _, _ = call(port, "POST", "/predict", body, conn=conn, timeout=60)
                        answers[status] = answers.get(status, 0) + 1
                    except (OSError, http.client.HTTPException):
                        conn.close()
                        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

            threads = [threading.Thread(target=big) for _ in range(args.clients)]
            for t in threads:
                t.start()
            normal = NormalClients(port, 1, args.texts)
            time.sleep(args.seconds)
            stats = normal.finish()
            stop.set()
            for t in threads:
                t.join(120)
            out.append(f"{label}: a normal client's predict p99 {stats['predict']['p99_ms']:.0f} ms, health p99 "
                       f"{stats['health']['p99_ms']:.0f} ms ({stats['failures']} failed); big ones answered "
                       + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items())))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return f"huge: {args.clients} clients for {args.seconds:g} s each: " + "; ".join(out)


def health_probe(port: int, stop: threading.Event, worst: list[float]) -> None:
    while not stop.is_set():
        try:
            worst.append(call(port, "GET", "/health", timeout=30)[2])
        except OSError:
            worst.append(float("inf"))
        time.sleep(0.02)


def scenario_disconnects(model: Path, args) -> str:
    proc, port, lines = start_server(model, args.threads, ["--log-level", "info"])
    try:
        before = len(lines)
        stop, latencies = threading.Event(), []
        probe = threading.Thread(target=health_probe, args=(port, stop, latencies))
        probe.start()
        t = time.monotonic()
        for _ in range(args.disconnects):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b'{"texts": ["')
            s.close()
        took = time.monotonic() - t
        time.sleep(1.0)
        stop.set()
        probe.join()
        new = lines[before:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    tracebacks = sum("Traceback" in line for line in new)
    return (f"disconnects: {args.disconnects} clients gone mid-body in {took:.1f} s: {len(new)} log lines "
            f"({len(new) / args.disconnects:.2f} per disconnect, {tracebacks} tracebacks); /health worst "
            f"{1e3 * max(latencies):.0f} ms, p99 {1e3 * percentile(latencies, 99):.0f} ms")


def scenario_header(model: Path, args) -> str:
    proc, port, _ = start_server(model, args.threads, [])
    try:
        stop, latencies = threading.Event(), []
        probe = threading.Thread(target=health_probe, args=(port, stop, latencies))
        probe.start()
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        t = time.monotonic()
        answer, sent = b"", 0

        def send():
            nonlocal sent
            try:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ")
                chunk = b"a" * (1 << 20)
                for _ in range(100):
                    s.sendall(chunk)
                    sent += len(chunk)
            except OSError:
                pass

        sender = threading.Thread(target=send)
        sender.start()
        try:
            while b"\r\n\r\n" not in answer:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except OSError:
            pass
        refused_after = time.monotonic() - t
        s.close()
        sender.join(60)
        time.sleep(0.5)
        stop.set()
        probe.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    status = answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/") else "no answer"
    return (f"header: a 100 MB header block answered {status} after {refused_after:.2f} s ({sent / 1e6:.0f} MB "
            f"sent); /health worst {1e3 * max(latencies):.0f} ms meanwhile")


class KeepAliveLoad:
    """Keep-alive clients sending /predict back to back until the listener goes, and a probe
    that finds when it went; each request is recorded with when its sending ended."""

    def __init__(self, port: int, clients: int, body: bytes):
        self.port, self.body = port, body
        self.records: list[tuple[float, object]] = []
        self.listener_open_at = 0.0
        self.threads = [threading.Thread(target=self.client) for _ in range(clients)]
        self.threads.append(threading.Thread(target=self.probe))
        for t in self.threads:
            t.start()

    def client(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        while True:
            try:
                conn.request("POST", "/predict", body=self.body, headers={"Content-Type": "application/json"})
            except OSError:
                return
            sent = time.monotonic()
            try:
                resp = conn.getresponse()
                answer = json.loads(resp.read())
                ok = (resp.status == 200 and "labels" in answer) or (resp.status == 503 and "error" in answer)
                outcome = resp.status if ok else f"{resp.status} not JSON"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                outcome = type(exc).__name__
            self.records.append((sent, outcome))
            if not isinstance(outcome, int):
                return

    def probe(self) -> None:
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=5).close()
            except OSError:
                return
            self.listener_open_at = time.monotonic()
            time.sleep(0.005)

    def join(self) -> None:
        for t in self.threads:
            t.join(120)

    def lost(self) -> int:
        return sum(1 for t, o in self.records if t < self.listener_open_at and not isinstance(o, int))


def scenario_sigterm(model: Path, args) -> str:
    out = []
    body = json.dumps({"texts": args.texts[:4]}).encode()
    for workers in (1, 2):
        lost, exits, answered = [], [], 0
        for _ in range(args.runs):
            proc, port, _ = start_server(model, max(1, args.threads // workers), ["--workers", str(workers)])
            load = KeepAliveLoad(port, args.clients, body)
            time.sleep(2.0)
            t = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            proc.wait(120)
            exits.append(time.monotonic() - t)
            load.join()
            lost.append(load.lost())
            answered += len(load.records)
        out.append(f"{workers} worker(s): {args.runs} runs, {answered} requests, lost per run {lost}, exit after "
                   f"{min(exits):.2f}-{max(exits):.2f} s")
    return f"sigterm: {args.clients} keep-alive clients: " + "; ".join(out)


def scenario_graceful(model: Path, args) -> str:
    proc, port, _ = start_server(model, args.threads, ["--graceful-timeout", "1", "--max-texts", "256"])
    heavy = json.dumps({"texts": (args.texts * 256)[:256]}).encode()
    outcomes: list[object] = []

    def one():
        try:
            status, answer, _ = call(port, "POST", "/predict", heavy, timeout=120)
            outcomes.append(status if (status == 200 or (status == 503 and "error" in answer)) else f"{status}?")
        except (OSError, http.client.HTTPException, ValueError) as exc:
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=one) for _ in range(48)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
    exited = time.monotonic() - t0
    for t in threads:
        t.join(120)
    counts = dict(sorted(collections.Counter(map(str, outcomes)).items()))
    return (f"graceful: --graceful-timeout 1, 48 requests of 256 texts in flight: exit {exited:.2f} s after SIGTERM; "
            f"answers {counts}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    p.add_argument("--model", help="a packed model to use instead of a random one of --shape")
    p.add_argument("--only", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    p.add_argument("--threads", type=int, default=2, help="kernel threads per server (divided among workers)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--slow", type=int, default=200)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--disconnects", type=int, default=3000)
    p.add_argument("--runs", type=int, default=3, help="SIGTERM runs per worker count")
    args = p.parse_args(argv)
    args.texts, _ = mixed_texts(512)
    print(f"CPU: {cpu_name()}; shape {args.shape}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_model(args.shape, Path(tmp))
        for name in args.only:
            print(globals()[f"scenario_{name}"](model, args), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
