"""One decoder layer's training pass at a published model's shapes: where its time goes outside
the frozen-weight GEMMs, per fast path.

    python scripts/profile_layer.py --model Qwen/Qwen2.5-0.5B --rows 4 --seq 512 --dropout 0.05
    python scripts/profile_layer.py --variants peft,cpuft --dtype bf16 --repeats 5 --profile

Builds one decoder layer of the model's own config class (cpuft.testing.architectures'
published shapes, random weights, nothing downloaded), puts PEFT LoRA (r 16, alpha 32, every
linear layer) on it, and times forward + backward of `rows x seq` tokens under the dtype's
autocast, with the weights in that dtype, as `cpuft sft` trains. Variants:

- `peft`: PEFT's own LoRA forward (the stock path);
- `fused`: cpuft's fused LoRA node alone (cpuft.fastpaths.fused_lora);
- `cpuft`: every fast path the plan turns on for a long run (cpuft.fastpaths.apply_fast_paths:
  fused LoRA plus the compiled elementwise kernels).

It also times the layer's frozen-weight GEMMs alone at the same shapes (x W^T forward and g W
for the input gradient, per linear layer) and reports each variant's time *outside* them, per
1,000 tokens: the non-GEMM work this script exists to shrink. Variants run interleaved
(A B A B ...), medians reported, so a shared machine slows both alike. `--profile` adds
torch.profiler's top ops for each variant.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Qwen/Qwen2.5-0.5B", help="a published model's hub id (cpuft.testing.architectures)")
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--dropout", type=float, default=0.05)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--variants", default="peft,cpuft")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: one per physical core (the plan's)")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--out", type=Path)
    return parser.parse_args(argv)


def build_layer(model_id: str, dtype, dropout: float, variant: str):
    """(decoder layer with LoRA, its rotary embedding module); random weights, seed 0."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM

    from cpuft.testing.architectures import PUBLISHED_MODELS

    published = next(m for m in PUBLISHED_MODELS if m.hub_id == model_id)
    config = published.config()
    config.num_hidden_layers = 1
    config.vocab_size = 256
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    layer = model.model.layers[0]
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear")
    lora.target_modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    inject_adapter_in_model(lora, layer)
    for name, p in layer.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()  # the plan's adapter dtype on CPU: fp32 masters
            if "lora_B" in name:  # PEFT starts B at zero; a non-zero B exercises every gradient
                torch.nn.init.normal_(p, std=0.02)
    if variant == "fused":  # cpuft's fused LoRA alone (the previous round's path)
        from cpuft.fastpaths.fused_lora import fuse_lora_layers

        fuse_lora_layers(layer)
    elif variant == "cpuft":  # every fast path the plan turns on for a long run
        from types import SimpleNamespace

        from cpuft.fastpaths import apply_fast_paths

        print(apply_fast_paths(layer, SimpleNamespace(fused_lora=True, compiled_elementwise=True, short_row_attention=False)))
        # The attention switch is a config change (short_row_attention): the layer shares the model's config.
        from cpuft.fastpaths.short_attention import use_short_row_attention

        use_short_row_attention(model)
    layer.train()
    return layer, model.model.rotary_emb


def time_layer(layer, rotary, rows: int, seq: int, dtype, autocast: bool) -> float:
    import torch

    hidden = layer.self_attn.config.hidden_size
    x = (torch.randn(rows, seq, hidden) * 0.5).to(dtype).requires_grad_(True)
    positions = torch.arange(seq).unsqueeze(0).expand(rows, -1)
    grad = torch.randn(rows, seq, hidden).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        embeddings = rotary(x, positions)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = layer(x, attention_mask=None, position_ids=positions, position_embeddings=embeddings)
    out = out[0] if isinstance(out, tuple) else out
    out.backward(grad)
    return time.perf_counter() - start


def time_frozen_gemms(layer, tokens: int, dtype) -> float:
    """x W^T and g W for every LoRA-adapted linear's frozen weight: the GEMMs a LoRA step must run."""
    import torch

    total = 0.0
    for name, module in layer.named_modules():
        base = getattr(module, "base_layer", None)
        if not isinstance(base, torch.nn.Linear):
            continue
        w = base.weight.detach().to(dtype)
        x = torch.randn(tokens, w.shape[1]).to(dtype)
        g = torch.randn(tokens, w.shape[0]).to(dtype)
        torch.nn.functional.linear(x, w)
        torch.mm(g, w)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            torch.nn.functional.linear(x, w)
            torch.mm(g, w)
            best = min(best, time.perf_counter() - start)
        total += best
    return total


def main(argv) -> int:
    import torch

    args = parse_args(argv)
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.plan import PlanRequest, plan_for

    torch.set_num_threads(args.threads or plan_for(probe_machine(), PlanRequest(device="cpu")).threads)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = args.dtype == "bf16"
    variants = args.variants.split(",")
    layers = {v: build_layer(args.model, dtype, args.dropout, v) for v in variants}
    tokens = args.rows * args.seq
    for v in variants:  # warm-up: oneDNN primitives, allocator, compiled kernels
        for _ in range(2):
            time_layer(*layers[v], args.rows, args.seq, dtype, autocast)
    samples = {v: [] for v in variants}
    gemm_samples = []
    for _ in range(args.repeats):  # interleaved, the GEMMs alone too: a shared machine slows all alike
        for v in variants:
            samples[v].append(time_layer(*layers[v], args.rows, args.seq, dtype, autocast))
        gemm_samples.append(time_frozen_gemms(layers[variants[0]][0], tokens, dtype))
    gemm = statistics.median(gemm_samples)
    result = {
        "command": "python scripts/profile_layer.py " + " ".join(argv), "model": args.model,
        "rows": args.rows, "seq": args.seq, "dropout": args.dropout, "dtype": args.dtype,
        "threads": torch.get_num_threads(), "frozen_gemm_seconds": gemm, "load_average": os.getloadavg(),
        "variants": {},
    }
    print(f"{args.model} layer, {args.rows} x {args.seq} tokens, {args.dtype}, dropout {args.dropout},"
          f" {torch.get_num_threads()} threads; frozen-weight GEMMs alone {gemm * 1e3:.0f} ms")
    print("| variant | layer fwd+bwd (median) | outside frozen GEMMs | per 1,000 tokens |\n|---|---|---|---|")
    for v in variants:
        median = statistics.median(samples[v])
        outside = max(0.0, median - gemm)
        result["variants"][v] = {"seconds": samples[v], "median": median, "outside_gemm": outside,
                                 "outside_gemm_per_1k_tokens": outside / tokens * 1000}
        print(f"| {v} | {median * 1e3:.0f} ms | {outside * 1e3:.0f} ms | {outside / tokens * 1e6:.1f} ms |")
    if len(variants) > 1:
        first = result["variants"][variants[0]]["outside_gemm"]
        for v in variants[1:]:
            ratio = first / max(result["variants"][v]["outside_gemm"], 1e-9)
            print(f"{variants[0]} / {v}, time outside the frozen GEMMs: {ratio:.2f}x")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        for v in variants:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                time_layer(*layers[v], args.rows, args.seq, dtype, autocast)
            print(f"\n{v}:\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
