"""Load test of `bibert serve` on loopback: batching of concurrent requests on vs off.

Two servers run the same model on 127.0.0.1: one batches concurrent requests (up to 64 texts,
1 ms window: the defaults), the other runs each request alone (--max-batch 1). Closed-loop clients (32 by
default, one keep-alive connection each, standard library asyncio) send requests for a
bounded time, alternating between the servers in rounds so that noise from a shared machine
hits both alike. Requests:

- well-formed (90%): 1, 2, 4 or 8 texts (60/20/15/5%), each one to four Rotten Tomatoes
  snippets joined (mixed lengths, about 10 to 128 tokens); 10% of them with pairs;
- malformed (10%): invalid JSON, wrong types, an unknown field, pairs that do not match,
  a lone surrogate, too many texts (413), a body over the limit (413), a wrong method
  (405) or path (404). Each must be answered 4xx.

Reported per mode: requests/s and texts/s of the well-formed requests, latency p50/p90/p99,
failures (a well-formed request not answered 200 with one label per text, or a connection
error), malformed requests not answered 4xx, the server's mean batch, and whether each
server is healthy afterwards and exits cleanly on SIGTERM.

    python benchmarks/serve_load.py                       # 32 clients, 60 s per mode
    python benchmarks/serve_load.py --clients 8 --seconds 20 --shape bert-base
Writes benchmarks/results/serve_load.json and .md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from batch_predict_throughput import RESULTS, SHAPES, build_model, cpu_name, mixed_texts  # noqa: E402

MAX_TEXTS = 64
MODES = {"batching on": ["--max-batch", "64", "--batch-window-ms", "1"], "batching off": ["--max-batch", "1"]}


def start_server(model: Path, threads: int, extra: list[str]) -> tuple[subprocess.Popen, int, list[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bibert.cli", "serve", "--model", str(model), "--host", "127.0.0.1", "--port", "0",
         "--threads", str(threads), "--max-texts", str(MAX_TEXTS), "--log-level", "warning", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: list[str] = []
    ready = threading.Event()

    def drain():
        for line in proc.stderr:
            lines.append(line)
            if "on http://" in line:
                ready.set()

    threading.Thread(target=drain, daemon=True).start()
    if not ready.wait(180):
        proc.kill()
        raise SystemExit("server did not start:\n" + "".join(lines))
    port = int(re.search(r"http://127\.0\.0\.1:(\d+)", "".join(lines)).group(1))
    for _ in range(600):
        try:
            if health(port)[0] == 200:
                return proc, port, lines
        except OSError:
            time.sleep(0.1)
    raise SystemExit("server not healthy:\n" + "".join(lines))


def _stat_seconds(path: str, with_children: bool) -> float:
    """User + system CPU seconds from a /proc stat file (Linux; NaN when it cannot be read):
    utime and stime, and with_children also the finished children's cutime and cstime."""
    try:
        fields = Path(path).read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in fields[11:15 if with_children else 13]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, its finished children and its live ones (a
    server's forked workers), from /proc (Linux)."""
    total = _stat_seconds(f"/proc/{pid}/stat", with_children=True)
    if total != total:
        return total
    children = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            pass
    for child in children:
        t = cpu_seconds(child)
        if t == t:  # a child that ended meanwhile is in the finished children's time
            total += t
    return total


def thread_cpu(pid: int, ids: dict[str, int]) -> dict[str, float]:
    """User + system CPU seconds of the named threads of a process, from /proc (Linux)."""
    return {name: _stat_seconds(f"/proc/{pid}/task/{tid}/stat", with_children=False) for name, tid in ids.items()}


def health(port: int) -> tuple[int, dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as r:
        return r.status, json.loads(r.read())


def http(method: str, path: str, body: bytes) -> bytes:
    return (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def request_pool(mix: dict[int, float], short: bool = False, seed: int = 0) -> tuple[list, list, tuple]:
    """Well-formed requests (texts count, bytes), malformed ones (kind, bytes) and the
    oversized one (kind, bytes)."""
    rng = random.Random(seed)
    texts, _ = mixed_texts(20000, seed, parts=(1,) if short else (1, 1, 1, 2, 2, 3, 4))
    snippets, _ = mixed_texts(2000, seed + 1)
    good = []
    for _ in range(3000):
        n = rng.choices(list(mix), weights=list(mix.values()))[0]
        body = {"texts": [rng.choice(texts) for _ in range(n)]}
        if rng.random() < 0.1:
            body["pairs"] = [rng.choice(snippets)[:200] for _ in range(n)]
        good.append((n, http("POST", "/predict", json.dumps(body).encode())))
    bad = [
        ("invalid JSON", http("POST", "/predict", b'{"texts": ["an unfinished')),
        ("not an object", http("POST", "/predict", b'["a", "b"]')),
        ("texts a string", http("POST", "/predict", b'{"texts": "one text"}')),
        ("texts of numbers", http("POST", "/predict", b'{"texts": [1, 2]}')),
        ("unknown field", http("POST", "/predict", b'{"text": ["a"]}')),
        ("pairs mismatch", http("POST", "/predict", b'{"texts": ["a", "b"], "pairs": ["c"]}')),
        ("lone surrogate", http("POST", "/predict", b'{"texts": ["\\ud800"]}')),
        ("too many texts", http("POST", "/predict", json.dumps({"texts": ["a"] * (MAX_TEXTS + 1)}).encode())),
        ("wrong method", http("GET", "/predict", b"")),
        ("wrong path", http("POST", "/predicts", b'{"texts": ["a"]}')),
    ]
    big = http("POST", "/predict", b'{"texts": ["' + b"a" * (1100 * 1024) + b'"]}')
    return good, bad, ("body too large", big)


class Stats:
    def __init__(self):
        self.latencies: list[float] = []
        self.texts = 0
        self.failed: dict[str, int] = {}
        self.malformed = 0
        self.malformed_not_4xx: dict[str, int] = {}
        self.malformed_status: dict[int, int] = {}
        self.seconds = 0.0
        self.server_cpu = 0.0
        self.client_cpu = 0.0

    def fail(self, why: str):
        self.failed[why] = self.failed.get(why, 0) + 1


async def read_response(reader) -> tuple[int, bytes, bool]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            close = True
    body = await reader.readexactly(length) if length else b""
    return status, body, close


async def client(port: int, deadline: float, stats: Stats, pool, rng: random.Random, max_requests: int):
    good, bad, big = pool
    reader = writer = None
    sent = 0
    while time.monotonic() < deadline and sent < max_requests:
        sent += 1
        r = rng.random()
        if r < 0.9:
            kind, n, raw = "good", *rng.choice(good)
        elif r < 0.995:
            kind, raw = rng.choice(bad)
            n = 0
        else:
            kind, raw = big
            n = 0
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            t = time.perf_counter()
            writer.write(raw)
            status, body, close = await asyncio.wait_for(read_response(reader), 60)
            dt = time.perf_counter() - t
        except Exception as exc:  # a connection error or a timeout
            if writer is not None:
                writer.close()
            reader = writer = None
            if kind == "good":
                stats.fail(type(exc).__name__)
            else:
                stats.malformed += 1
                stats.malformed_not_4xx[kind] = stats.malformed_not_4xx.get(kind, 0) + 1
            continue
        if kind == "good":
            ok = status == 200
            if ok:
                try:
                    answer = json.loads(body)
                    ok = len(answer["labels"]) == n and len(answer["scores"]) == n
                except (ValueError, KeyError, TypeError):
                    ok = False
            if ok:
                stats.latencies.append(dt)
                stats.texts += n
            else:
                stats.fail(f"status {status}")
        else:
            stats.malformed += 1
            stats.malformed_status[status] = stats.malformed_status.get(status, 0) + 1
            if not 400 <= status < 500:
                stats.malformed_not_4xx[kind] = stats.malformed_not_4xx.get(kind, 0) + 1
        if close:
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def segment(port: int, clients: int, seconds: float, stats: Stats, pool, seed: int, max_requests: int):
    start = time.monotonic()
    deadline = start + seconds
    await asyncio.gather(*(client(port, deadline, stats, pool, random.Random(seed * 1000 + i), max_requests)
                           for i in range(clients)))
    stats.seconds += time.monotonic() - start


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    p.add_argument("--model", help="a packed model to serve instead of a random one of --shape")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=60, help="measured seconds per mode (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=4, help="alternations between the modes (default: %(default)s)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="kernel threads per server (default: every core, as `bibert serve` picks; the client and "
                   "the servers share them)")
    p.add_argument("--max-requests", type=int, default=200000, help="cap per client and segment")
    p.add_argument("--mix", default="1=80,2=10,4=7,8=3",
                   help="texts per well-formed request and their weights (default: %(default)s)")
    p.add_argument("--short", action="store_true", help="texts of one snippet each (about 10 to 60 tokens) "
                   "instead of one to four")
    p.add_argument("--mode", action="append", metavar="NAME=FLAGS",
                   help='a server to load, e.g. "batching on=--max-batch 16 --batch-window-ms 1" (repeatable; '
                   "replaces the mode of that name; default: batching on and off as below)")
    p.add_argument("--out", help="results stem (default: benchmarks/results/serve_load)")
    args = p.parse_args(argv)
    try:
        mix = {int(k): float(v) for k, v in (part.split("=") for part in args.mix.split(","))}
    except ValueError:
        raise SystemExit(f"--mix {args.mix!r}: give TEXTS=WEIGHT pairs, e.g. 1=80,2=10,4=10") from None
    modes = dict(MODES)
    for spec in args.mode or []:
        name, _, flags = spec.partition("=")
        modes[name.strip()] = flags.split()
    if not 1 <= args.clients <= 256 or not 0 < args.seconds <= 600:
        raise SystemExit("--clients must be 1..256 and --seconds 0..600")

    work = Path(tempfile.mkdtemp(prefix="bibert-serve-load-"))
    servers = {}
    try:
        model = Path(args.model) if args.model else build_model(args.shape, work)
        pool = request_pool(mix, short=args.short)
        for mode, extra in modes.items():
            servers[mode] = start_server(model, args.threads, extra)
        stats = {mode: Stats() for mode in modes}
        try:
            import uvloop  # a faster client leaves more of the shared cores to the servers
            run = uvloop.run
        except ImportError:
            run = asyncio.run
        for mode in modes:  # warm-up, not counted
            run(segment(servers[mode][1], args.clients, 2.0, Stats(), pool, 99, args.max_requests))
        first = {mode: health(servers[mode][1])[1] for mode in modes}
        before = {mode: first[mode]["served"] for mode in modes}
        # per-thread CPU where the server is one process (with workers, /health answers from one of them)
        tids = {mode: first[mode].get("thread_ids") if first[mode]["pid"] == servers[mode][0].pid else None
                for mode in modes}
        by_thread = {mode: {} for mode in modes}
        per = args.seconds / args.rounds
        order = list(modes)
        for r in range(args.rounds):
            for mode in (order if r % 2 == 0 else order[::-1]):
                pid = servers[mode][0].pid
                cpu, mine = cpu_seconds(pid), time.process_time()
                threads0 = thread_cpu(pid, tids[mode]) if tids[mode] else {}
                run(segment(servers[mode][1], args.clients, per, stats[mode], pool, r, args.max_requests))
                stats[mode].server_cpu += cpu_seconds(pid) - cpu
                for name, t in (thread_cpu(pid, tids[mode]) if tids[mode] else {}).items():
                    by_thread[mode][name] = by_thread[mode].get(name, 0.0) + t - threads0[name]
                stats[mode].client_cpu += time.process_time() - mine
                s = stats[mode]
                print(f"round {r + 1}/{args.rounds} {mode}: {len(s.latencies) / s.seconds:.1f} req/s so far, "
                      f"failed {sum(s.failed.values())}", flush=True)
        results = {}
        for mode, (proc, port, lines) in servers.items():
            status, h = health(port)
            served = {k: h["served"][k] - before[mode][k] for k in h["served"]}
            s = stats[mode]
            results[mode] = {
                "requests": len(s.latencies), "seconds": round(s.seconds, 1),
                "requests_per_s": round(len(s.latencies) / s.seconds, 1),
                "texts_per_s": round(s.texts / s.seconds, 1),
                "latency_ms": {q: round(1000 * percentile(s.latencies, float(q[1:])), 1)
                               for q in ("p50", "p90", "p99")} | {"max": round(1000 * max(s.latencies), 1)},
                "failed_well_formed": sum(s.failed.values()), "failures": s.failed,
                "malformed": s.malformed, "malformed_status": {str(k): v for k, v in sorted(s.malformed_status.items())},
                "malformed_not_4xx": s.malformed_not_4xx,
                "server_cpu_ms_per_request": round(1000 * s.server_cpu / max(1, len(s.latencies) + s.malformed), 3),
                "server_cpu_ms_per_text": round(1000 * s.server_cpu / max(1, s.texts), 3),
                "server_cores_busy": round(s.server_cpu / s.seconds, 2),
                "server_cpu_ms_per_request_by_thread": _by_thread(by_thread[mode], s.server_cpu,
                                                                  len(s.latencies) + s.malformed),
                "client_cpu_ms_per_request": round(1000 * s.client_cpu / max(1, len(s.latencies) + s.malformed), 3),
                "server_mean_batch_texts": round(served["texts"] / max(1, served["batches"]), 1),
                "server_mean_batch_requests": round(served["requests"] / max(1, served["batches"]), 2),
                "healthy_after": status == 200 and h["status"] == "ok",
            }
        for mode, (proc, port, lines) in servers.items():
            proc.send_signal(signal.SIGTERM)
            try:
                results[mode]["exit_code_on_sigterm"] = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                results[mode]["exit_code_on_sigterm"] = None
        servers.clear()
    finally:
        for proc, _, _ in servers.values():
            proc.kill()
        shutil.rmtree(work, ignore_errors=True)
    on, off = results["batching on"], results["batching off"]
    ratio = on["requests_per_s"] / off["requests_per_s"] if off["requests_per_s"] else float("inf")
    result = {
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        "model": args.model or f"{args.shape} (random weights)", "clients": args.clients,
        "seconds_per_mode": args.seconds, "rounds": args.rounds, "threads_per_server": args.threads,
        "max_texts": MAX_TEXTS, "texts_per_request_weights": mix, "short_texts": args.short, "modes": modes, "results": results, "speedup_requests_per_s": round(ratio, 2),
        "speedup_texts_per_s": round(on["texts_per_s"] / off["texts_per_s"], 2) if off["texts_per_s"] else None,
        "criteria": {
            "no_failed_well_formed": all(x["failed_well_formed"] == 0 for x in results.values()),
            "every_malformed_4xx": all(not x["malformed_not_4xx"] for x in results.values()),
            "healthy_after": all(x["healthy_after"] for x in results.values()),
            "clean_exit_on_sigterm": all(x["exit_code_on_sigterm"] == 0 for x in results.values()),
            "batching_at_least_2x": ratio >= 2,
        },
        "command": "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": time.strftime("%Y-%m-%d"),
    }
    stem = Path(args.out) if args.out else RESULTS / "serve_load"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    md = to_markdown(result)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


def _by_thread(threads: dict[str, float], total: float, requests: int) -> dict[str, float] | None:
    """Server CPU ms per request split by thread: the event loop (HTTP, JSON), the prep
    thread (tokenizer), the engine thread (its share of every forward, and Python around
    it) and the rest (the engine's other kernel threads, and the tokenizer's own threads)."""
    if not threads or requests == 0:
        return None
    split = {name: 1000 * t / requests for name, t in threads.items()}
    split["kernel workers and other"] = 1000 * (total - sum(threads.values())) / requests
    return {k: round(v, 3) for k, v in split.items()}


def to_markdown(r: dict) -> str:
    mix = ", ".join(f"{k} text{'s' if int(k) > 1 else ''}: {v:g}%" for k, v in r["texts_per_request_weights"].items())
    threads = r["threads_per_server"]
    lines = [
        f"# bibert serve under load: batching on vs off ({r['clients']} clients)",
        "",
        f"Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores shared by the client, both servers and "
        f"other jobs; {r['date']}. Model: {r['model']}; one server process each, {threads} kernel "
        f"thread{'s' if threads > 1 else ''}. {r['clients']} closed-loop keep-alive clients, "
        f"{r['seconds_per_mode']:g} s per mode in {r['rounds']} alternating rounds. 90% well-formed requests "
        f"({mix}; texts of {'one review snippet' if r.get('short_texts') else 'one to four review snippets'}; "
        "10% with pairs), 10% malformed.",
        "",
        "| mode | requests/s | texts/s | p50 ms | p90 ms | p99 ms | max ms | failed well-formed | malformed | "
        "malformed not 4xx | mean batch (texts / requests) | server CPU ms per request | per text | "
        "server cores busy | healthy after | exit on SIGTERM |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, x in r["results"].items():
        lat = x["latency_ms"]
        lines.append(f"| {mode} | {x['requests_per_s']} | {x['texts_per_s']} | {lat['p50']} | {lat['p90']} | "
                     f"{lat['p99']} | {lat['max']} | {x['failed_well_formed']} | {x['malformed']} | "
                     f"{sum(x['malformed_not_4xx'].values())} | {x['server_mean_batch_texts']} / "
                     f"{x['server_mean_batch_requests']} | {x['server_cpu_ms_per_request']} | "
                     f"{x['server_cpu_ms_per_text']} | {x['server_cores_busy']} | "
                     f"{'yes' if x['healthy_after'] else 'NO'} | {x['exit_code_on_sigterm']} |")
    split = {mode: x.get("server_cpu_ms_per_request_by_thread") for mode, x in r["results"].items()}
    split = {mode: v for mode, v in split.items() if v}
    if split:
        names = list(next(iter(split.values())))
        lines += ["", "Server CPU ms per request by thread (a server of one process):", "",
                  "| mode | " + " | ".join(n.replace("_", " ") for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        lines += [f"| {mode} | " + " | ".join(str(v[n]) for n in names) + " |" for mode, v in split.items()]
    c = r["criteria"]
    lines += ["", f"Batching on vs off: {r['speedup_requests_per_s']}x requests/s, {r['speedup_texts_per_s']}x texts/s.",
              "", "Checks: " + ", ".join(f"{k.replace('_', ' ')}: {'yes' if v else 'NO'}" for k, v in c.items()) + ".",
              "", "Server CPU is user + system time of the server process over the measured rounds (from /proc), "
              "per answered request (well-formed and malformed) and per text; on a shared machine it is steadier "
              "than requests/s, which follow the CPU share the server gets. The load generator used "
              + ", ".join(f"{x['client_cpu_ms_per_request']} ms ({mode})" for mode, x in r["results"].items())
              + " of CPU per request.",
              "", f"Reproduce: `{r['command'].strip()}`", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
