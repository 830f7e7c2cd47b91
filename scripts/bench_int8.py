#!/usr/bin/env python
"""Measure every available INT8 path for CPU inference against fp32, on a mid-size random Llama.

    python scripts/bench_int8.py                      # ~128M params, 3 interleaved rounds
    python scripts/bench_int8.py --rounds 5 --out bench-results/int8.json
    python scripts/bench_int8.py --dtype auto         # int8 methods over the dtype cpuft plans here

Why a mid-size model: on a tiny model int8 loses to fp32 because per-call overheads dominate
small matmuls (FACTS.md); 100-300M parameters is where the choice is real. Random weights are
enough for speed and for *relative* quality (agreement with fp32, perplexity change), not for
absolute quality.

Each measurement runs in a fresh subprocess (so peak RSS belongs to one method alone); the
methods are interleaved round by round (A B C A B C ...) and the table reports medians, with
ratios against the fp32 median of the same run. Measured per method:
- prefill tokens/s:   one forward of a batch-1 prompt of --prefill-tokens, no cache
- decode tokens/s:    --decode-tokens greedy steps with the KV cache (after a 16-token prompt)
- both also per CPU-second of the process: on a machine shared with other work, run with
  --threads 1 and trust the CPU-time ratios more than the wall-clock ones
- RSS after the runs (weights read into memory, not mapped), and peak RSS of the process (MiB)
- top-1 agreement:    teacher-forced argmax equal to fp32's, over the evaluation text
- greedy match:       fraction of a free-running greedy continuation equal to fp32's before the
                      first differing token
- perplexity delta:   relative change of perplexity on the evaluation text, which is text the fp32
                      model sampled itself (so its probabilities mean something even with random
                      weights)

Baselines: fp32 always; bf16 too where the CPU computes bf16 natively (AMX, AVX-512-BF16) or
with --dtype bf16, since bf16 is the speed an INT8 path has to beat there. `--dtype` is the model
dtype the int8 methods start from (default fp32; auto = what `cpuft generate --int8` plans on this
CPU); a method that takes fp32 activations only runs in fp32 whatever is asked, as cpuft does
(`cpuft.inference.int8.int8_model_dtype`), and the table names the dtype each row ran in.

On a shared machine the absolute numbers are noisy; compare ratios, and rerun on a quiet one.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from cpuft.dtypes import DTYPE_NAMES  # noqa: E402  (after the environment is set)

# ~128M parameters: 104M in 12 decoder layers + a 32k x 768 embedding tied to lm_head.
MODEL_SHAPE = dict(
    vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
)
# Bench-only variant: the default (per-tensor) qconfig of torch dynamic quantisation, to show why
# cpuft uses per-channel scales.
EXTRA_VARIANTS = ["torch-dynamic-per-tensor"]
BASELINES = ("fp32", "bf16")  # unquantised rows; ratios are against fp32


def build_bench_model(model_dir: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpuft.artifacts import atomic_directory

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_SHAPE))
    with atomic_directory(model_dir) as tmp:
        model.save_pretrained(tmp)


# ----------------------------------------------------------------------------- worker


def rss_bytes() -> int:
    """Resident memory now, after returning freed heap pages to the OS (glibc keeps them otherwise,
    and how much it keeps depends on allocation order more than on the method)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def timed_repeats(fn, repeats: int, budget_seconds: float) -> list[tuple[float, float]]:
    """(wall seconds, CPU seconds) of up to `repeats` calls of fn(), stopping early once
    `budget_seconds` of wall time are spent (slow methods).

    CPU time is the number to trust on a shared machine: with one thread it counts the work done
    and not the time spent waiting for a core. (With several threads, OpenMP spin-waits inflate it.)
    """
    times: list[tuple[float, float]] = []
    while len(times) < repeats and sum(wall for wall, _ in times) < budget_seconds:
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - wall, time.process_time() - cpu))
    return times


def model_dtype(method: str, dtype: str) -> str:
    """The dtype `method` runs in when the int8 methods are asked to start from `dtype`."""
    from cpuft.inference.int8 import int8_model_dtype

    if method in BASELINES:
        return method
    if method in EXTRA_VARIANTS:
        return "fp32"  # torch dynamic quantisation, like torch-dynamic
    return int8_model_dtype(method, dtype)[0]


def load(model_dir: Path, method: str, dtype: str = "fp32"):
    from transformers import AutoModelForCausalLM

    from cpuft.dtypes import torch_dtype
    from cpuft.inference.int8 import quantize_for_cpu_inference

    # Read into memory rather than mmap the checkpoint: mapped file pages stay counted in RSS after
    # quantisation drops the float weights they back, which would hide the memory int8 saves.
    # cpuft.inference.loading loads the same way when it quantises.
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch_dtype(model_dtype(method, dtype)), disable_mmap=True
    ).eval()
    started = time.perf_counter()
    if method == "torch-dynamic-per-tensor":
        import torch

        from cpuft.inference.int8 import _untie_lm_head

        _untie_lm_head(model)
        torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
    elif method not in BASELINES:
        quantize_for_cpu_inference(model, method)
    return model, time.perf_counter() - started


def decode_steps(model, prompt, steps: int) -> list[int]:
    """Greedy-decode `steps` tokens after `prompt` with the KV cache; returns the tokens."""
    import torch

    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        tokens = [token.item()]
        for _ in range(steps - 1):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            tokens.append(token.item())
        return tokens


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    ref = torch.load(args.ref, weights_only=True) if args.ref else None
    model, quantize_seconds = load(args.model_dir, args.method, args.dtype)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, MODEL_SHAPE["vocab_size"], (1, args.prefill_tokens), generator=generator)

    def prefill():
        with torch.inference_mode():
            model(prompt, use_cache=False)

    with torch.inference_mode():
        model(prompt[:, :16])  # warm-up: first-call allocations and kernel selection
    prefill_times = timed_repeats(prefill, args.repeats, budget_seconds=20)
    decode_prompt = prompt[:, :16]
    decode_steps(model, decode_prompt, 4)  # warm-up
    greedy: list[int] = []

    def decode():
        greedy[:] = decode_steps(model, decode_prompt, args.decode_tokens)

    # The timed region includes the 16-token prompt's forward; at 16 tokens it is one decode step's
    # worth of weight reads, so it is counted as one more step.
    decode_times = timed_repeats(decode, args.repeats, budget_seconds=20)

    result = {
        "method": args.method,
        "dtype": model_dtype(args.method, args.dtype),
        "quantize_seconds": quantize_seconds,
        "prefill_tokens_per_second": args.prefill_tokens / statistics.median(w for w, _ in prefill_times),
        "prefill_tokens_per_cpu_second": args.prefill_tokens / statistics.median(c for _, c in prefill_times),
        "decode_tokens_per_second": args.decode_tokens / statistics.median(w for w, _ in decode_times),
        "decode_tokens_per_cpu_second": args.decode_tokens / statistics.median(c for _, c in decode_times),
        "rss_mib": rss_bytes() / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "greedy": greedy,
    }
    if ref is not None:
        with torch.inference_mode():
            logits = model(ref["eval_ids"]).logits[:, :-1].float()
        targets = ref["eval_ids"][:, 1:]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        result["top1_agreement"] = (logits.argmax(-1) == ref["fp32_argmax"]).float().mean().item()
        result["perplexity"] = float(torch.exp(nll))
        matching = 0
        for mine, theirs in zip(greedy, ref["fp32_greedy"].tolist()):
            if mine != theirs:
                break
            matching += 1
        result["greedy_match"] = matching / len(greedy)
    return result


def make_reference(args) -> None:
    """fp32 evaluation text (sampled by the fp32 model itself), its argmax and its greedy decode."""
    import torch

    torch.set_num_threads(args.threads)
    model, _ = load(args.model_dir, "fp32")
    torch.manual_seed(2)
    starts = torch.randint(0, MODEL_SHAPE["vocab_size"], (args.eval_sequences, 4))
    with torch.inference_mode():
        eval_ids = model.generate(
            starts, attention_mask=torch.ones_like(starts), do_sample=True, temperature=1.0, top_k=0,
            max_new_tokens=args.eval_tokens, min_new_tokens=args.eval_tokens, pad_token_id=0,
        )
        fp32_argmax = model(eval_ids).logits[:, :-1].argmax(-1)
    prompt = torch.randint(0, MODEL_SHAPE["vocab_size"], (1, args.prefill_tokens), generator=torch.Generator().manual_seed(1))
    greedy = decode_steps(model, prompt[:, :16], args.decode_tokens)
    torch.save({"eval_ids": eval_ids, "fp32_argmax": fp32_argmax, "fp32_greedy": torch.tensor(greedy)}, args.ref)


# ----------------------------------------------------------------------------- orchestrator


def run_worker(args, method: str, ref: Path) -> dict:
    command = [
        sys.executable, __file__, "--worker", method, "--model-dir", str(args.model_dir), "--ref", str(ref),
        "--threads", str(args.threads), "--prefill-tokens", str(args.prefill_tokens),
        "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats), "--dtype", args.dtype,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"method": method, "error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "failed"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    keys = ["prefill_tokens_per_second", "decode_tokens_per_second", "prefill_tokens_per_cpu_second",
            "decode_tokens_per_cpu_second", "rss_mib", "peak_rss_mib",
            "quantize_seconds", "top1_agreement", "greedy_match", "perplexity"]
    table = {}
    for method, results in runs.items():
        good = [r for r in results if "error" not in r]
        if not good:
            table[method] = {"error": results[0]["error"]}
            continue
        row = {k: statistics.median(r[k] for r in good) for k in keys if k in good[0]}
        row["dtype"] = good[0].get("dtype", "fp32")
        row["prefill_all"] = [round(r["prefill_tokens_per_second"], 1) for r in good]
        row["decode_all"] = [round(r["decode_tokens_per_second"], 2) for r in good]
        table[method] = row
    base = table["fp32"]
    for row in table.values():
        if "error" in row:
            continue
        row["prefill_ratio"] = row["prefill_tokens_per_second"] / base["prefill_tokens_per_second"]
        row["decode_ratio"] = row["decode_tokens_per_second"] / base["decode_tokens_per_second"]
        row["prefill_cpu_ratio"] = row["prefill_tokens_per_cpu_second"] / base["prefill_tokens_per_cpu_second"]
        row["decode_cpu_ratio"] = row["decode_tokens_per_cpu_second"] / base["decode_tokens_per_cpu_second"]
        row["rss_ratio"] = row["rss_mib"] / base["rss_mib"]
        row["perplexity_delta"] = row["perplexity"] / base["perplexity"] - 1.0
    return table


def markdown_table(table: dict[str, dict]) -> str:
    lines = [
        "| method | prefill tok/s | × fp32 (wall) | × fp32 (CPU time) | decode tok/s | × fp32 (wall) |"
        " × fp32 (CPU time) | RSS MiB (× fp32) | peak RSS MiB | top-1 agree | greedy match | ppl Δ |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for method, r in table.items():
        if "error" in r:
            lines.append(f"| {method} | failed: {r['error'][:80]} |" + " |" * 11)
            continue
        label = method if method in BASELINES or r["dtype"] == "fp32" else f"{method} ({r['dtype']})"
        lines.append(
            f"| {label} | {r['prefill_tokens_per_second']:.0f} | {r['prefill_ratio']:.2f} | {r['prefill_cpu_ratio']:.2f} | "
            f"{r['decode_tokens_per_second']:.1f} | {r['decode_ratio']:.2f} | {r['decode_cpu_ratio']:.2f} | "
            f"{r['rss_mib']:.0f} ({r['rss_ratio']:.2f}) | {r['peak_rss_mib']:.0f} | "
            f"{r['top1_agreement']:.3f} | {r['greedy_match']:.2f} | {r['perplexity_delta']:+.2%} |"
        )
    return "\n".join(lines)


def orchestrate(args) -> None:
    from cpuft.hardware.probe import probe_machine
    from cpuft.inference.int8 import available_int8_methods, cpu_kind

    machine = probe_machine()
    if not (args.model_dir / "config.json").is_file():
        print(f"building the benchmark model in {args.model_dir} ...", flush=True)
        build_bench_model(args.model_dir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ref = args.out.with_suffix(".ref.pt")
    print("fp32 reference (evaluation text sampled by the fp32 model) ...", flush=True)
    args.ref = ref
    make_reference(args)

    available = available_int8_methods()
    if args.dtype == "auto":
        from cpuft.planning.plan import PlanRequest, plan_for

        args.dtype = plan_for(machine, PlanRequest(device="cpu", quant="none", threads=args.threads)).compute_dtype
    baselines = ["fp32", "bf16"] if machine.native_bf16 or args.dtype == "bf16" else ["fp32"]
    methods = baselines + [m for m, missing in available.items() if missing is None] + EXTRA_VARIANTS
    if args.methods:
        methods = ["fp32"] + [m for m in args.methods.split(",") if m != "fp32"]
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    total = args.rounds * len(methods)
    done = 0
    for round_index in range(args.rounds):
        order = methods if round_index % 2 == 0 else list(reversed(methods))  # A B C, C B A, ...
        for method in order:
            result = run_worker(args, method, ref)
            runs[method].append(result)
            done += 1
            brief = result.get("error") or (
                f"prefill {result['prefill_tokens_per_second']:.0f} tok/s, decode {result['decode_tokens_per_second']:.1f} tok/s"
            )
            print(f"[{done}/{total}] round {round_index + 1} {method}: {brief}", flush=True)

    table = summarize(runs)
    report = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpu": machine.cpu_name, "cpu_kind": cpu_kind(machine), "isa": machine.torch_cpu_isa,
                    "physical_cores": machine.physical_cores, "threads": args.threads, "python": platform.python_version()},
        "model": {**MODEL_SHAPE, "parameters": _param_count(args.model_dir)},
        "settings": {k: getattr(args, k) for k in ("rounds", "repeats", "prefill_tokens", "decode_tokens", "eval_sequences", "eval_tokens", "dtype")},
        "unavailable": {m: why for m, why in available.items() if why},
        "summary": table,
        "runs": runs,
    }
    from cpuft.artifacts import atomic_write_json

    atomic_write_json(args.out, report)
    print()
    print(f"{report['model']['parameters'] / 1e6:.0f}M-parameter random Llama, {machine.cpu_name} ({cpu_kind(machine)}),"
          f" {args.threads} threads, medians of {args.rounds} interleaved rounds")
    print(markdown_table(table))
    print(f"\nwritten: {args.out}")


def _param_count(model_dir: Path) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/cpuft-bench-llama-128m"), help="built here once, reused")
    parser.add_argument("--out", type=Path, default=Path("bench-results/int8.json"))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per method (median reported)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats inside one process")
    parser.add_argument("--threads", type=int, default=None, help="compute threads (default: physical cores)")
    parser.add_argument("--prefill-tokens", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--eval-sequences", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=128)
    parser.add_argument("--methods", default=None, help="comma-separated subset (fp32 is always measured; bf16 is a baseline name)")
    parser.add_argument("--dtype", default="fp32", choices=("auto", *DTYPE_NAMES),
                        help="model dtype the int8 methods start from (default %(default)s; auto: cpuft's plan for this CPU)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--ref", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is None:
        from cpuft.hardware.probe import probe_machine

        args.threads = probe_machine().physical_cores
    if args.worker:
        args.method = args.worker
        print(json.dumps(worker(args)))
    else:
        orchestrate(args)


if __name__ == "__main__":
    main()
