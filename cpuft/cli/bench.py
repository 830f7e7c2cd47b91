"""`cpuft bench`: cpuft against plain TRL (defaults, tuned by hand, and its best) on the same job:
LoRA SFT (`--job sft`, the default) or DPO preference tuning (`--job dpo`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from cpuft.errors import UserError

EPILOG = """\
Variants, each in its own process (same model, LoRA, data, max_length, optimizer, steps, seed):
  trl_defaults  plain TRL SFTTrainer + PEFT with TRL's defaults (bf16 autocast, gradient
                checkpointing on) -- what a newcomer runs
  trl_tuned     plain TRL tuned by hand: fp32 unless bf16 is native, no checkpointing,
                one thread per physical core
  trl_best      the strongest plain TRL: trl_tuned plus bf16 base weights where bf16 is
                native, fused AdamW (optim="adamw_torch_fused") and TRL's padding-free
                packing (packing=True, packing_strategy="bfd")
  cpuft         cpuft's recipe with its plan for this machine
  cpuft_fp32    added on AMX/AVX512-BF16 CPUs: cpuft forced to fp32, to show bf16 vs fp32
  cpuft_bf16    run only when named: cpuft forced to bf16 (where the plan measured fp32 faster)

--trl-micro-batches 1,2,4 runs trl_best once per micro-batch size (packed rows per micro-batch,
the same rows per optimizer step through accumulation), each reported as trl_best_mbN; the
fastest is trl_best, which the ratios are computed against (bench.json: trl_best_run).

Reported per variant: non-padding tokens/s, median step time, peak RSS, padding fraction,
final train loss, held-out loss (same fp32 evaluation for all), MFU against this machine's
measured matmul FLOP/s. Writes OUT/bench.json (ratios are top-level numbers; the headline,
speedup_vs_best_trl, is against the fastest TRL variant of the run, named in best_trl_variant)
and OUT/bench.png.

Sizes: tiny (CI smoke test), 3m (~3M params, where bf16 and fp32 are close), 100m (~95M params),
and the shapes people train, with random weights and their full published vocabulary: qwen0.5b
(Qwen2.5-0.5B, 494M) and llama1b (Llama-3.2-1B, 1.24B); the tokenizer is the bench's small BPE,
so ids use the vocabulary's low range.

--job dpo: the same bench for preference tuning (`cpuft dpo`), on synthetic LIMA-shaped preference
pairs (chosen: the full reply; rejected: a short reply or its words shuffled) or --dataset PAIRS:
  trl_defaults  plain TRL DPOTrainer + PEFT with DPOConfig's defaults (run only when named)
  trl_best      plain DPOTrainer at its best: bf16 weights and autocast where native, no
                checkpointing, fused AdamW, TRL's length grouping (group_by_length);
                same batch and accumulation (in pairs) as cpuft
  cpuft         `cpuft dpo`'s stages with its plan for this machine
Reported: non-padding tokens/s (prompt+chosen and prompt+rejected), peak RSS, TRL's held-out
eval_rewards/accuracies and margins; bench.json: speedup_vs_trl_best, peak_rss_ratio_vs_trl_best,
reward_accuracy_diff_vs_trl_best.

Timings are only as quiet as the machine: on a shared machine use --repeats 3 (variants run
interleaved, medians reported).

examples:
  cpuft bench --size tiny --out bench-results/tiny            smoke test, ~1 minute
  cpuft bench --size 3m --repeats 2 --trl-micro-batches 1,2,4  ~3M params, trl_best at its fastest
  cpuft bench --size 100m --out bench-results/100m            the headline (~95M params)
  cpuft bench --size 100m --variants trl_tuned,cpuft --repeats 3
  cpuft bench --size qwen0.5b --variants trl_best,cpuft --repeats 2   Qwen2.5-0.5B's shapes
  cpuft bench --size 100m --onednn-verbose onednn.log         on AMX: which kernels ran
  cpuft bench --job dpo --size tiny --repeats 2               DPO: cpuft dpo vs plain DPOTrainer
"""


def register(subparsers) -> None:
    from cpuft.bench.sizes import (
        DPO_DEFAULT_VARIANTS,
        DPO_VARIANTS,
        JOBS,
        SIZES,
        VARIANTS,
    )

    parser = subparsers.add_parser(
        "bench",
        help="measure cpuft against plain TRL on the same job",
        description="Run the same LoRA SFT job as plain TRL (defaults), plain TRL tuned for this CPU,"
        " and cpuft; report tokens/s, step time, peak RSS, loss, MFU and the ratios.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--job", choices=list(JOBS), default="sft",
                        help="sft: LoRA supervised fine-tuning (SFTTrainer); dpo: preference tuning (DPOTrainer)"
                        " (default %(default)s)")
    parser.add_argument("--size", choices=list(SIZES), default="tiny",
                        help="tiny: CI smoke test; 3m: ~3M params; 100m: ~95M params; qwen0.5b, llama1b: those models' published"
                        " shapes, random weights (default %(default)s)")
    parser.add_argument("--out", default=None, help="output directory (default bench-results/<size>, bench-results/dpo-<size> for --job dpo)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the size's own)")
    parser.add_argument("--variants", default=None,
                        help=f"comma-separated subset of {','.join(VARIANTS)} (sft, default all) or"
                        f" {','.join(DPO_VARIANTS)} (dpo, default {','.join(DPO_DEFAULT_VARIANTS)});"
                        " cpuft_fp32 and cpuft_bf16 too")
    parser.add_argument("--repeats", type=int, default=1,
                        help="run every variant N times, interleaved; medians reported (default 1)")
    parser.add_argument("--dataset", default=None,
                        help="instead of the synthetic LIMA-shaped data: a messages-format .jsonl (sft), or a file"
                        " of preference pairs in any format `cpuft dpo` reads (dpo)")
    parser.add_argument("--trl-micro-batches", metavar="N,N,...", default=None,
                        help="run trl_best once per micro-batch size (packed rows; same rows per optimizer step)"
                        " and compare cpuft with the fastest (default: once, its batch fitted to the steps)")
    parser.add_argument("--onednn-verbose", metavar="FILE", default=None,
                        help="run the cpuft variant with ONEDNN_VERBOSE=1 and write its output to FILE"
                        " (shows AMX/AVX-512 kernels on Xeon)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from cpuft.bench.orchestrator import BenchOptions, run_bench
    from cpuft.bench.report import format_bench_table
    from cpuft.bench.sizes import job_variants

    variants = None
    if args.variants is not None:
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        if not variants:
            raise UserError(f"--variants is empty; name at least one of {', '.join(job_variants(args.job))}.")
    options = BenchOptions(
        job=args.job,
        size=args.size,
        out_dir=Path(args.out or (f"bench-results/dpo-{args.size}" if args.job == "dpo" else f"bench-results/{args.size}")),
        steps=args.steps,
        variants=variants,
        repeats=args.repeats,
        dataset=args.dataset,
        onednn_verbose=Path(args.onednn_verbose) if args.onednn_verbose else None,
        trl_micro_batches=_micro_batches(args.trl_micro_batches),
    )
    report = run_bench(options, log=lambda msg: print(msg, flush=True))
    print()
    print(format_bench_table(report))
    print(f"\nwrote {options.out_dir / 'bench.json'} and {options.out_dir / 'bench.png'}")
    return 0



def _micro_batches(text: str | None) -> tuple[int, ...] | None:
    """--trl-micro-batches "1,2,4" -> (1, 2, 4); UserError naming the flag for anything else."""
    if text is None:
        return None
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise UserError(f"--trl-micro-batches takes sizes separated by commas, e.g. 1,2,4; got {text!r}.") from None
