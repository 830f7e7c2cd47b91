#!/usr/bin/env python
"""QLoRA (NF4 + double quant) against plain LoRA on the same model: tokens/s and peak memory.

CPU: NF4 QLoRA vs fp32 LoRA (fp32 is cpuft's plan on AVX2; add --dtype bf16 on AMX machines).
CUDA: NF4 QLoRA vs bf16 LoRA (+ LLM.int8 with --int8), paged 8-bit AdamW for QLoRA as the plan does.

Each measurement runs in a fresh process (peak RSS is per process), variants interleaved
A B A B for --repeats rounds; the report gives medians and ratios against the plain-LoRA baseline
of the same run, next to the memory plan's estimate for the same settings.

    python scripts/bench_qlora.py                     # CPU, a random 8-layer Llama built here
    python scripts/bench_qlora.py --device cuda       # on a GPU box
    python scripts/bench_qlora.py --model DIR --batch 4 --seq 512 --steps 8 --repeats 3

Training steps use a plain loop (forward, backward, AdamW step) on random tokens, so the number
is the step cost of the two weight formats, without data loading or the trainer's bookkeeping.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="LoRA baseline dtype (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--model", help="model directory (default: build a random Llama of --hidden/--layers)")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="timed steps per measurement (after 2 warm-up steps)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--int8", action="store_true", help="also measure LLM.int8 + LoRA")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- one measurement


def worker(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from cpuft.hardware.usage import peak_rss_bytes

    if args.threads:
        torch.set_num_threads(args.threads)
    variant, dtype_name = args.worker.split(":")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    kwargs = {"dtype": dtype, "attn_implementation": "sdpa"}
    if variant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    elif variant == "int8":
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if variant != "lora":
        kwargs["device_map"] = {"": 0 if args.device == "cuda" else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(args.model, **kwargs)
    if variant == "lora" and args.device == "cuda":
        model = model.to("cuda")
    if variant != "lora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    if args.device == "cuda" and variant != "lora":
        import bitsandbytes as bnb

        optimizer = bnb.optim.PagedAdamW8bit(trainable, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    device = "cuda" if args.device == "cuda" else "cpu"
    autocast = torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32)

    def step():
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=generator).to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    model.train()
    for _ in range(2):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        losses.append(step())
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_seconds = statistics.median(times)
    return {
        "variant": args.worker,
        "step_seconds": step_seconds,
        "tokens_per_second": args.batch * args.seq / step_seconds,
        "peak_rss_bytes": peak_rss_bytes(),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if device == "cuda" else None,
        "final_loss": losses[-1],
        "trainable_params": sum(p.numel() for p in trainable),
    }


# ----------------------------------------------------------------------------- the comparison


def build_model(args, directory: Path) -> str:
    import random

    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    rng = random.Random(0)
    words = [f"w{i}" for i in range(3000)]
    texts = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(400)]
    spec = TinyModelSpec(vocab_size=args.vocab, hidden_size=args.hidden, num_layers=args.layers, num_heads=8,
                         num_kv_heads=4, intermediate_size=args.intermediate)
    return str(build_tiny_model(directory / "model", texts=texts, spec=spec))


def estimate(args, variant: str, dtype: str) -> dict:
    from transformers import AutoConfig

    from cpuft.planning.memory import RunSettings, model_shape, plan_memory

    shape = model_shape(AutoConfig.from_pretrained(args.model))
    settings = RunSettings(
        quantization="none" if variant == "lora" else variant, weights_dtype=dtype, compute_dtype=dtype,
        batch_size=args.batch, seq_len=args.seq, lora_r=args.lora_r, device=args.device,
        optimizer="paged_adamw_8bit" if args.device == "cuda" and variant != "lora" else "adamw_torch",
    )
    plan = plan_memory(shape, settings)
    return {"total_bytes": plan.total_bytes, "total_params": shape.total_params, **plan.categories()}


def main() -> int:
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)))
        return 0
    dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    variants = [f"lora:{dtype}", f"nf4:{dtype}"] + ([f"int8:{dtype}"] if args.int8 else [])
    with tempfile.TemporaryDirectory() as tmp:
        if not args.model:
            args.model = build_model(args, Path(tmp))
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for round_index in range(args.repeats):
            for variant in variants:  # interleaved: A B A B
                cmd = [sys.executable, __file__, "--worker", variant, *_forwarded(args)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
                if done.returncode != 0 or line is None:
                    print(done.stderr[-3000:], file=sys.stderr)
                    raise SystemExit(f"{variant} failed (exit {done.returncode})")
                result = json.loads(line[len("RESULT "):])
                results[variant].append(result)
                print(f"round {round_index + 1} {variant:<10} {result['tokens_per_second']:8.1f} tok/s"
                      f"  peak RSS {result['peak_rss_bytes'] / 2**20:7.0f} MiB", flush=True)
        report = summarise(args, variants, results)
    print(format_report(args, report))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def _forwarded(args) -> list[str]:
    out = ["--device", args.device, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
           "--steps", str(args.steps), "--lora-r", str(args.lora_r)]
    if args.threads:
        out += ["--threads", str(args.threads)]
    return out


def summarise(args, variants, results) -> dict:
    baseline = variants[0]
    rows = {}
    for variant in variants:
        runs = results[variant]
        quant, dtype = variant.split(":")
        memory_key = "peak_gpu_bytes" if args.device == "cuda" else "peak_rss_bytes"
        rows[variant] = {
            "tokens_per_second": statistics.median(r["tokens_per_second"] for r in runs),
            "peak_memory_bytes": statistics.median(r[memory_key] for r in runs),
            "runs": runs,
            "estimate": estimate(args, quant, dtype),
        }
    base = rows[baseline]
    for row in rows.values():
        row["speed_vs_baseline"] = row["tokens_per_second"] / base["tokens_per_second"]
        row["memory_vs_baseline"] = row["peak_memory_bytes"] / base["peak_memory_bytes"]
    return {"device": args.device, "model": args.model, "batch": args.batch, "seq": args.seq, "steps": args.steps,
            "repeats": args.repeats, "baseline": baseline, "variants": rows}


def format_report(args, report) -> str:
    memory_name = "peak GPU alloc" if args.device == "cuda" else "peak RSS"
    lines = ["", f"{'variant':<12} {'tok/s':>8} {'speed':>7} {memory_name + ' MiB':>18} {'memory':>7} {'plan MiB':>9}"]
    for variant, row in report["variants"].items():
        lines.append(
            f"{variant:<12} {row['tokens_per_second']:8.1f} {row['speed_vs_baseline']:6.2f}x"
            f" {row['peak_memory_bytes'] / 2**20:18.0f} {row['memory_vs_baseline']:6.2f}x"
            f" {row['estimate']['total_bytes'] / 2**20:9.0f}"
        )
    lines.append(f"medians of {args.repeats} interleaved runs x {args.steps} steps; ratios against {report['baseline']}"
                 f" measured in the same run; batch {args.batch} x {args.seq} tokens.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    raise SystemExit(main())
