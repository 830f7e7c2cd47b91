#!/usr/bin/env python
"""Throughput of an OpenAI-compatible server under concurrency: requests/s and generated tokens/s.

By default it builds (once, kept in --work-dir) a random Llama of ~100M parameters with the
shapes of `cpuft bench --size 100m`, starts `cpuft serve` on 127.0.0.1 once per --batch-sizes
value, and for each --clients count sends a fixed number of requests from that many threads:
chat completions, greedy, `ignore_eos` (so every request generates exactly --max-tokens tokens
and engines are compared on equal work), each with its own prompt of about --prompt-words
words. `--url` benchmarks a server that is already running instead (e.g. vLLM's OpenAI server
on the same model directory: pass `--model-name` as it names the model).

Prints a markdown table (clients, requests, wall s, requests/s, generated tokens/s, median and
p90 latency, 429s, and generated tokens per CPU-second of the server's process tree) and writes
the rows to --out as JSON. On a machine shared with other work the wall-clock figures swing with
the neighbours' load; tokens per server CPU-second moves much less, so compare configurations
on that (for --url, pass --pid with the server's process id to get it). Traffic goes to 127.0.0.1 only, the
request count is fixed, and every request has a timeout.

  python scripts/bench_serve.py                           # cpuft serve, batch 1 and 8, 1/4/16 clients
  python scripts/bench_serve.py --url http://127.0.0.1:8001 --model-name /path/to/model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

WORDS = ("cpu tensor model token batch queue server thread cache matrix vector kernel memory adapter "
         "prompt answer layer weight float").split()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="benchmark this running server instead of starting cpuft serve")
    parser.add_argument("--label", default="external server", help="with --url: the server's name in the table")
    parser.add_argument("--pid", type=int, default=None, help="with --url: the server's process id, for its CPU time")
    parser.add_argument("--model-name", default=None, help="model id to send (default: the served model's, from /v1/models)")
    parser.add_argument("--model", default=None, help="model directory for cpuft serve (default: build the 100m random model)")
    parser.add_argument("--work-dir", default="bench-serve", help="where the built model and results go (default %(default)s)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=16, help="requests per client count, at least 2 per client (default %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=48)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="cpuft serve --max-batch-size values to compare")
    parser.add_argument("--serve-args", default="", help="extra cpuft serve flags, e.g. '--dtype bf16'")
    parser.add_argument("--out", default=None, help="JSON results (default WORK_DIR/results-<time>.json)")
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.url:
        rows += run_levels(args.url.rstrip("/"), args.model_name, args, label=args.label, pid=args.pid)
    else:
        model = Path(args.model) if args.model else build_100m_model(work / "model-100m")
        for batch in args.batch_sizes:
            with serving(model, batch, max(args.clients), args.serve_args) as url:
                rows += run_levels(url, None, args, label=f"cpuft serve, batch <= {batch}", pid=serving.pid)
    print_table(rows)
    out = Path(args.out) if args.out else work / f"results-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\nwritten: {out}", file=sys.stderr)
    return 0


def build_100m_model(out_dir: Path) -> Path:
    if (out_dir / "config.json").is_file():
        return out_dir
    from cpuft.bench.sizes import SIZES
    from cpuft.testing.tiny_model import build_tiny_model

    print(f"building the random 100m model in {out_dir} ...", file=sys.stderr)
    return build_tiny_model(out_dir, spec=SIZES["100m"].model)


class serving:
    """`cpuft serve MODEL` on 127.0.0.1 (a free port) for the length of a `with` block."""

    pid: int | None = None  # of the server running now

    def __init__(self, model: Path, batch: int, clients: int, extra: str):
        self.command = [sys.executable, "-m", "cpuft", "serve", str(model), "--port", "0", "--log-level", "warning",
                        "--max-batch-size", str(batch), "--max-queue", str(max(clients, 1)), *extra.split()]

    def __enter__(self) -> str:
        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        serving.pid = self.process.pid
        deadline = time.monotonic() + 600
        for line in self.process.stderr:
            sys.stderr.write(line)
            if line.startswith("serving ") and " on http://" in line:
                url = line.split(" on ", 1)[1].split("/v1")[0]
                break
            if time.monotonic() > deadline:
                raise SystemExit("cpuft serve did not start in 10 minutes")
        else:
            raise SystemExit(f"cpuft serve exited with {self.process.wait()}")
        threading.Thread(target=lambda: [None for _ in self.process.stderr], daemon=True).start()  # drain
        wait_healthy(url)
        return url

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=60)


def wait_healthy(url: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}/health did not answer 200 in {timeout:.0f} s")


def prompt(i: int, words: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(words)) + f" (request {i})"


def run_levels(url: str, model_name: str | None, args, label: str, pid: int | None) -> list[dict]:
    wait_healthy(url)
    name = model_name or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
    one(url, name, prompt(-1, args.prompt_words), args.max_tokens)  # warm-up: first-call allocations, lazy imports
    return [level(url, name, clients, args, label, pid) for clients in args.clients]


def process_tree_cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its live descendants (vLLM runs its engine in a child)."""
    children: dict[int, list[int]] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))  # fields[1]: ppid
        times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += times.get(current, 0.0)
        todo.extend(children.get(current, []))
    return total


def one(url: str, name: str, text: str, max_tokens: int, http: httpx.Client | None = None) -> tuple[int, int, float]:
    body = {"model": name, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True}
    start = time.perf_counter()
    response = (http or httpx).post(f"{url}/v1/chat/completions", json=body, timeout=600)
    elapsed = time.perf_counter() - start
    tokens = response.json()["usage"]["completion_tokens"] if response.status_code == 200 else 0
    return response.status_code, tokens, elapsed


def level(url: str, name: str, clients: int, args, label: str, pid: int | None) -> dict:
    total = max(args.requests, 2 * clients)
    queue = list(range(total))
    lock = threading.Lock()
    results: list[tuple[int, int, float]] = []

    def client() -> None:
        with httpx.Client() as http:
            while True:
                with lock:
                    if not queue:
                        return
                    i = queue.pop()
                outcome = one(url, name, prompt(i, args.prompt_words), args.max_tokens, http)
                with lock:
                    results.append(outcome)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    cpu_before = process_tree_cpu_seconds(pid) if pid else None
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    server_cpu = process_tree_cpu_seconds(pid) - cpu_before if pid else None
    ok = [r for r in results if r[0] == 200]
    latencies = sorted(r[2] for r in ok)
    row = {
        "server": label, "clients": clients, "requests": total, "ok": len(ok),
        "rejected_429": sum(r[0] == 429 for r in results), "wall_s": round(wall, 2),
        "requests_per_s": round(len(ok) / wall, 3), "generated_tokens_per_s": round(sum(r[1] for r in ok) / wall, 1),
        "latency_p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "latency_p90_s": round(latencies[int(0.9 * (len(latencies) - 1))], 2) if latencies else None,
        "server_cpu_s": round(server_cpu, 1) if server_cpu else None,
        "generated_tokens_per_cpu_s": round(sum(r[1] for r in ok) / server_cpu, 1) if server_cpu else None,
        "max_tokens": args.max_tokens, "prompt_words": args.prompt_words, "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def print_table(rows: list[dict]) -> None:
    print("| server | clients | requests | wall s | requests/s | generated tokens/s | p50 latency s | p90 latency s | 429s"
          " | tokens per server CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['server']} | {r['clients']} | {r['ok']}/{r['requests']} | {r['wall_s']} | {r['requests_per_s']} |"
              f" {r['generated_tokens_per_s']} | {r['latency_p50_s']} | {r['latency_p90_s']} | {r['rejected_429']} |"
              f" {r['generated_tokens_per_cpu_s']} |")


if __name__ == "__main__":
    raise SystemExit(main())
