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

Several adapters (issue 24): `--adapters 1 4` serves the model with 1 and then 4 random LoRA
adapters (r 16, every linear layer; built once with PEFT, no training) in adapters mode and sends
the requests round-robin over the adapters, so batches mix them; `--rss` compares the peak RSS
(VmHWM) of one server holding four adapters with the sum of four single-adapter servers;
`--int8-shapes` measures fp32, bf16 and --int8 at Qwen2.5-0.5B's shapes (random weights, built
locally from its config: cpuft.bench.sizes "qwen0.5b"), each in its own process, at each
--threads count, --repeats rounds interleaved (medians printed, every run too): load seconds
(int8: quantising included), a 128-token prefill (one forward, logits for all 128 positions),
32 greedy decode steps with the KV cache (the 16-token prompt's forward not timed), and greedy
agreement with fp32.

  python scripts/bench_serve.py --adapters 1 4 --batch-sizes 8 --serve-args "--threads 2"
  python scripts/bench_serve.py --rss
  python scripts/bench_serve.py --int8-shapes --threads 1 2 --repeats 2
  python scripts/bench_serve.py --gemm-m1 --threads 1 2 --repeats 3   # decode's GEMMs alone, fp32 vs bf16
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
    parser.add_argument("--adapters", type=int, nargs="+", default=None, help="serve this many random LoRA adapters (adapters mode)")
    parser.add_argument("--rss", action="store_true", help="peak RSS: one server with 4 adapters vs 4 single-adapter servers")
    parser.add_argument("--int8-shapes", action="store_true", help="bf16 vs int8 at Qwen2.5-0.5B shapes: prefill/decode tokens/s, greedy agreement")
    parser.add_argument("--gemm-m1", action="store_true", help="fp32 vs bf16 torch linear at M=1 (decode) at Qwen2.5-0.5B shapes")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="with --int8-shapes: torch thread counts to compare")
    parser.add_argument("--repeats", type=int, default=2, help="with --int8-shapes: interleaved rounds (default %(default)s)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        print(json.dumps(precision_worker(Path(args.model), args.worker, args.worker_threads)))
        return 0
    if args.int8_shapes:
        return int8_shapes(work, args.threads, args.repeats)
    if args.gemm_m1:
        return gemm_m1(args.threads, args.repeats)
    rows = []
    if args.rss:
        model = Path(args.model) if args.model else build_100m_model(work / "model-100m")
        return rss_comparison(model, random_adapters(model, work, 4), args.serve_args)
    if args.adapters:
        model = Path(args.model) if args.model else build_100m_model(work / "model-100m")
        for count in args.adapters:
            adapters = random_adapters(model, work, count)
            specs = [f"{path.name}={path}" for path in adapters]
            for batch in args.batch_sizes:
                with serving(specs, batch, max(args.clients), args.serve_args) as url:
                    names = [path.name for path in adapters]
                    rows += run_levels(url, names, args, label=f"{count} adapter{'s' * (count > 1)}, batch <= {batch}", pid=serving.pid)
    elif args.url:
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


def random_adapters(model: Path, work: Path, count: int) -> list[Path]:
    """`count` random LoRA adapters on `model` (r 16, alpha 32, every linear layer), built once:
    random B as well as A, so each changes the model's outputs as a trained one would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = [work / f"adapter-{i}" for i in range(count)]
    for i, path in enumerate(paths):
        if (path / "adapter_model.safetensors").is_file():
            continue
        torch.manual_seed(100 + i)
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        peft_model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False))
        peft_model.save_pretrained(path)
        AutoTokenizer.from_pretrained(model).save_pretrained(path)
    return paths


def vm_mib(pid: int, field: str) -> float:
    """/proc/PID/status's `field` (VmHWM: peak resident set; VmRSS: resident now) in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_comparison(model: Path, adapters: list[Path], extra: str) -> int:
    """Resident memory after one request per adapter, of one server with all of them and of one
    server each: the peak (VmHWM, which loading usually sets: the checkpoint read next to the
    converted weights) and what stays resident while serving (VmRSS)."""
    def measure(specs: list[str]) -> tuple[float, float]:
        with serving(specs, 4, 4, extra) as url:
            for name in [spec.split("=", 1)[0] for spec in specs]:
                one(url, name, prompt(0, 16), 8)
            return vm_mib(serving.pid, "VmHWM"), vm_mib(serving.pid, "VmRSS")

    together = measure([f"{p.name}={p}" for p in adapters])
    apart = [measure([f"{p.name}={p}"]) for p in adapters]
    print("| servers | adapters each | peak RSS MiB (VmHWM; sum) | resident while serving MiB (VmRSS; sum) |")
    print("|---|---:|---:|---:|")
    print(f"| 1 | {len(adapters)} | {together[0]:.0f} | {together[1]:.0f} |")
    print(f"| {len(apart)} | 1 | {sum(r[0] for r in apart):.0f} ({' + '.join(f'{r[0]:.0f}' for r in apart)})"
          f" | {sum(r[1] for r in apart):.0f} ({' + '.join(f'{r[1]:.0f}' for r in apart)}) |")
    return 0


def precision_worker(model: Path, precision: str, threads: int) -> dict:
    """One precision in this process, `threads` torch threads: load as `cpuft serve` would (timed:
    int8 includes quantising), then, each timed 3 times after a warm-up (median kept), a 128-token
    prefill (one forward) and 32 greedy decode steps with the KV cache (one forward of one token
    each, the cache carried over, as `generate` does: no prompt in the timed part). Returns the
    greedy tokens for the agreement check."""
    import torch

    from cpuft.hardware.probe import probe_machine
    from cpuft.inference.int8 import default_int8_method
    from cpuft.inference.loading import load_for_inference, resolve_source

    torch.set_num_threads(threads)
    method = default_int8_method(probe_machine()) if precision == "int8" else None
    start = time.perf_counter()
    loaded = load_for_inference(resolve_source(str(model)), dtype="fp32" if precision == "int8" else precision, int8=method)
    load_s = time.perf_counter() - start
    torch.manual_seed(0)
    prompt = torch.randint(10, 4000, (1, 128))
    steps = 32
    with torch.inference_mode():
        def prefill():
            loaded.model(input_ids=prompt, use_cache=False)

        def decode() -> list[int]:
            out = loaded.model(input_ids=prompt[:, :16], use_cache=True)
            cache, token, tokens = out.cache, out.logits[:, -1].argmax(-1, keepdim=True), []
            started = time.perf_counter()
            for _ in range(steps):
                tokens.append(int(token))
                out = loaded.model(input_ids=token, cache=cache, use_cache=True)
                cache, token = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
            decode.seconds = time.perf_counter() - started
            return tokens

        prefill(), decode()  # warm-up: first-call allocations, oneDNN primitive creation
        prefill_s = statistics.median(_timed(prefill) for _ in range(3))
        decode_s = []
        for _ in range(3):
            tokens = decode()
            decode_s.append(decode.seconds)
    return {"precision": loaded.precision, "threads": threads, "load_s": round(load_s, 1),
            "prefill_tokens_per_s": round(128 / prefill_s, 1), "decode_tokens_per_s": round(steps / statistics.median(decode_s), 1),
            "load_average_1min": os.getloadavg()[0], "tokens": tokens}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def int8_shapes(work: Path, threads_list: list[int], repeats: int) -> int:
    """fp32, bf16 and int8 (each in its own process) at Qwen2.5-0.5B shapes, interleaved: for each
    repeat, every thread count, every precision, so a neighbour's burst of load hits them alike.
    Prints every run, then the medians, and the greedy agreement with fp32's tokens."""
    from cpuft.bench.orchestrator import bench_model
    from cpuft.bench.sizes import SIZES

    model = bench_model(work, "qwen0.5b", SIZES["qwen0.5b"], lambda m: print(m, file=sys.stderr))
    runs: list[dict] = []
    for repeat in range(repeats):
        for threads in threads_list:
            for precision in ("fp32", "bf16", "int8"):
                out = subprocess.run([sys.executable, __file__, "--worker", precision, "--worker-threads", str(threads),
                                      "--model", str(model), "--work-dir", str(work)],
                                     capture_output=True, text=True, timeout=1200, check=False)
                if out.returncode != 0:
                    raise SystemExit(out.stderr[-3000:])
                run = {"repeat": repeat, "kind": precision, **json.loads(out.stdout.strip().splitlines()[-1])}
                print(json.dumps({k: v for k, v in run.items() if k != "tokens"}), file=sys.stderr, flush=True)
                runs.append(run)
    (work / f"precision-{time.strftime('%Y%m%d-%H%M%S')}.json").write_text(json.dumps(runs, indent=2) + "\n")
    reference = next(r["tokens"] for r in runs if r["kind"] == "fp32")
    print("| precision | threads | load s (median) | prefill tokens/s (128-token prompt; median) | decode tokens/s (batch 1; median)"
          " | runs | greedy tokens equal to fp32's before the first difference |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for threads in threads_list:
        for kind in ("fp32", "bf16", "int8"):
            mine = [r for r in runs if r["kind"] == kind and r["threads"] == threads]
            same = next((i for i, (a, b) in enumerate(zip(mine[0]["tokens"], reference)) if a != b), len(reference))
            print(f"| {mine[0]['precision']} | {threads} | {statistics.median(r['load_s'] for r in mine):.1f}"
                  f" | {statistics.median(r['prefill_tokens_per_s'] for r in mine):.1f}"
                  f" ({', '.join(str(r['prefill_tokens_per_s']) for r in mine)})"
                  f" | {statistics.median(r['decode_tokens_per_s'] for r in mine):.1f}"
                  f" ({', '.join(str(r['decode_tokens_per_s']) for r in mine)}) | {len(mine)} | {same}/{len(reference)} |")
    return 0


# Qwen2.5-0.5B's linear layers (out, in): a decode step runs each of them at M=1.
QWEN05_LINEARS = {"q_proj / o_proj": (896, 896), "k_proj / v_proj": (128, 896), "gate_proj / up_proj": (4864, 896),
                  "down_proj": (896, 4864), "lm_head": (151936, 896)}


def gemm_m1(threads_list: list[int], repeats: int) -> int:
    """torch.nn.functional.linear at M=1 (one token: a decode step's GEMMs) in fp32 and bf16 at
    Qwen2.5-0.5B's shapes, for each thread count; rounds interleave the thread counts and the
    dtypes, each figure the median of 5 timings of 20 calls (lm_head: 3 calls) after a warm-up."""
    import torch
    import torch.nn.functional as F

    def median_ms(fn, calls: int) -> float:
        fn(), fn()
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            timings.append((time.perf_counter() - start) / calls * 1e3)
        return statistics.median(timings)

    weights = {name: torch.randn(*shape) for name, shape in QWEN05_LINEARS.items()}
    results: dict[tuple[str, int, str], list[float]] = {}
    with torch.inference_mode():
        for _ in range(repeats):
            for threads in threads_list:
                torch.set_num_threads(threads)
                for name, weight in weights.items():
                    calls = 3 if weight.shape[0] > 100_000 else 20
                    for dtype in (torch.float32, torch.bfloat16):
                        w, x = weight.to(dtype), torch.randn(1, 1, weight.shape[1], dtype=dtype)
                        results.setdefault((name, threads, str(dtype)[6:]), []).append(median_ms(lambda x=x, w=w: F.linear(x, w), calls))
    print(f"| linear (out x in) | threads | fp32 ms | bf16 ms | bf16 / fp32 |  (load average {os.getloadavg()[0]:.1f})")
    print("|---|---:|---:|---:|---:|")
    for threads in threads_list:
        for name, shape in QWEN05_LINEARS.items():
            fp32 = statistics.median(results[(name, threads, "float32")])
            bf16 = statistics.median(results[(name, threads, "bfloat16")])
            print(f"| {name} {shape[0]} x {shape[1]} | {threads} | {fp32:.3f} | {bf16:.3f} | {bf16 / fp32:.2f} |")
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

    def __init__(self, model: Path | list[str], batch: int, clients: int, extra: str):
        models = [str(model)] if isinstance(model, Path) else list(model)
        self.command = [sys.executable, "-m", "cpuft", "serve", *models, "--port", "0", "--log-level", "warning",
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


def run_levels(url: str, model_name: str | list[str] | None, args, label: str, pid: int | None) -> list[dict]:
    """`model_name` a list: the requests go round-robin over those models (adapters)."""
    wait_healthy(url)
    names = model_name if isinstance(model_name, list) else [model_name or httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]]
    for name in names:
        one(url, name, prompt(-1, args.prompt_words), args.max_tokens)  # warm-up: first-call allocations, lazy imports
    return [level(url, names, clients, args, label, pid) for clients in args.clients]


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


def level(url: str, names: list[str], clients: int, args, label: str, pid: int | None) -> dict:
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
                outcome = one(url, names[i % len(names)], prompt(i, args.prompt_words), args.max_tokens, http)
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
