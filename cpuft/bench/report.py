"""The bench's report: bench.json (medians over repeats, MFU, the headline ratios), the chart
bench.png and the console table.

MFU here is against the matmul FLOP/s measured on this machine at the model's MLP shape (not a
datasheet number), in the dtype the variant computed in. Ratios compare variants of the same
bench run only; numbers from different machines or runs are not comparable.

`--job dpo` (`build_dpo_report`): the same record per variant, with TRL's held-out reward
accuracy and margin in place of the SFT yardstick's loss, and cpuft's ratios against trl_best
(and trl_defaults when run): tokens/s, peak RSS, and the reward accuracy difference.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from cpuft.artifacts import save_figure
from cpuft.bench.sizes import (
    CPUFT_BF16,
    CPUFT_FP32,
    DPO_OPTIMIZER_SETTINGS,
    DPO_TRL_VARIANTS,
    LORA_SETTINGS,
    OPTIMIZER_SETTINGS,
    TRL_BEST,
    TRL_BEST_AT,
    TRL_VARIANTS,
    describe_model,
)

# The keys whose median over repeats is the variant's number.
MEDIAN_KEYS = ("tokens_per_second", "median_step_seconds", "train_seconds", "peak_rss_bytes", "final_loss",
               "eval_loss", "padding_fraction", "achieved_flops_per_second", "planned_train_seconds",
               "eval_reward_accuracy", "eval_reward_margin")


def median_run(results: list[dict]) -> dict:
    """The variant's numbers: medians over repeats, plus every repeat's tokens/s."""
    merged = dict(results[0])
    for key in MEDIAN_KEYS:
        values = [r[key] for r in results if r.get(key) is not None]
        merged[key] = statistics.median(values) if values else None
    merged["repeats"] = len(results)
    merged["tokens_per_second_each_repeat"] = [r["tokens_per_second"] for r in results]
    return merged


def median_variants(runs: dict, gemm: dict) -> dict:
    """Each variant's median record, with its MFU against the measured GEMM of its dtype."""
    variants = {name: median_run(results) for name, results in runs.items() if results}
    for run in variants.values():
        peak = gemm["bf16" if run.get("compute_dtype") == "bf16" and "bf16" in gemm else "fp32"]["flops_per_second"]
        run["gemm_peak_flops_per_second"] = peak
        run["mfu_vs_measured_gemm"] = run["achieved_flops_per_second"] / peak if peak else None
    return variants


def build_report(command: str, size_name: str, size, machine, gemm: dict, runs: dict, data_note: str,
                 job: str = "sft") -> dict:
    """bench.json's content. `runs` maps each variant to its workers' results, one per repeat."""
    if job == "dpo":
        return build_dpo_report(command, size_name, size, machine, gemm, runs, data_note)
    variants, trl_best_runs = with_fastest_trl_best(median_variants(runs, gemm))

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in variants and b in variants and variants[b].get(key):
            return variants[a][key] / variants[b][key]
        return None

    def loss_gap(a: str, b: str) -> float | None:
        if a in variants and b in variants:
            return (variants[a]["eval_loss"] - variants[b]["eval_loss"]) / variants[b]["eval_loss"]
        return None

    trl_runs = {name: run for name, run in variants.items() if name in TRL_VARIANTS}
    best_trl = max(trl_runs, key=lambda name: trl_runs[name]["tokens_per_second"]) if trl_runs else None

    return {
        "command": command,
        "size": size_name,
        "model": {**describe_model(size.model), "total_params": next(iter(variants.values()))["total_params"]},
        "steps": size.steps, "batch_size": size.batch_size, "accumulation": size.accumulation,
        "max_length": size.max_length, "data": data_note,
        "optimizer": OPTIMIZER_SETTINGS, "lora": LORA_SETTINGS,
        "machine": machine.to_dict(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gemm": gemm,
        # The headline: cpuft against the fastest TRL variant of this run, and which one that was.
        "best_trl_variant": best_trl,
        "speedup_vs_best_trl": ratio("cpuft", best_trl, "tokens_per_second") if best_trl else None,
        "eval_loss_rel_diff_vs_best_trl": loss_gap("cpuft", best_trl) if best_trl else None,
        "peak_rss_ratio_vs_best_trl": ratio("cpuft", best_trl, "peak_rss_bytes") if best_trl else None,
        # The other ratios, as plain top-level numbers.
        "speedup_vs_trl_best": ratio("cpuft", "trl_best", "tokens_per_second"),
        # --trl-micro-batches: trl_best is the fastest of its runs, one per micro-batch size.
        "trl_best_run": variants[TRL_BEST]["variant_run"] if trl_best_runs else None,
        "trl_best_micro_batch": variants[TRL_BEST]["batch_size"] if TRL_BEST in variants else None,
        "trl_best_tokens_per_second_by_run": trl_best_runs or None,
        "speedup_vs_trl_tuned": ratio("cpuft", "trl_tuned", "tokens_per_second"),
        "speedup_vs_trl_defaults": ratio("cpuft", "trl_defaults", "tokens_per_second"),
        "trl_tuned_speedup_vs_trl_defaults": ratio("trl_tuned", "trl_defaults", "tokens_per_second"),
        "eval_loss_rel_diff_vs_trl_tuned": loss_gap("cpuft", "trl_tuned"),
        "eval_loss_rel_diff_vs_trl_defaults": loss_gap("cpuft", "trl_defaults"),
        "peak_rss_ratio_vs_trl_tuned": ratio("cpuft", "trl_tuned", "peak_rss_bytes"),
        "peak_rss_ratio_vs_trl_defaults": ratio("cpuft", "trl_defaults", "peak_rss_bytes"),
        "bf16_speedup_vs_fp32": ratio(*_cpuft_runs_by_dtype(variants), "tokens_per_second"),
        # The dtype cpuft's plan chose, and why (measured on small models: cpuft.planning.dtype_choice).
        "cpuft_compute_dtype": variants.get("cpuft", {}).get("compute_dtype"),
        "cpuft_compute_dtype_reason": variants.get("cpuft", {}).get("compute_dtype_reason"),
        "cpuft_mfu_vs_measured_gemm": variants.get("cpuft", {}).get("mfu_vs_measured_gemm"),
        # The time plan `cpuft sft` printed over the training seconds it then took (1.0 = exact).
        "cpuft_planned_vs_measured_train_seconds": _plan_ratio(variants.get("cpuft")),
        "variants": variants,
    }


def build_dpo_report(command: str, size_name: str, size, machine, gemm: dict, runs: dict, data_note: str) -> dict:
    """bench.json's content for `--job dpo`: cpuft's DPO run against plain TRL DPOTrainer."""
    variants = median_variants(runs, gemm)

    def ratio(a: str, b: str, key: str) -> float | None:
        if a in variants and b in variants and variants[b].get(key):
            return variants[a][key] / variants[b][key]
        return None

    def accuracy_diff(a: str, b: str) -> float | None:
        if a in variants and b in variants:
            return variants[a]["eval_reward_accuracy"] - variants[b]["eval_reward_accuracy"]
        return None

    trl_runs = {name: run for name, run in variants.items() if name in DPO_TRL_VARIANTS}
    best_trl = max(trl_runs, key=lambda name: trl_runs[name]["tokens_per_second"]) if trl_runs else None
    first = next(iter(variants.values()))
    return {
        "job": "dpo",
        "command": command,
        "size": size_name,
        "model": {**describe_model(size.model), "total_params": first["total_params"]},
        # The batch in pairs; every pair is two sequences of up to max_length tokens.
        "steps": size.steps, "batch_size": size.batch_size, "accumulation": size.accumulation,
        "train_pairs": size.train_rows, "eval_pairs": first.get("eval_pairs"),
        "max_length": size.max_length, "data": data_note,
        "optimizer": DPO_OPTIMIZER_SETTINGS, "lora": LORA_SETTINGS,
        "dpo": {"beta": first.get("beta"), "loss_type": first.get("loss_type"), "reference": "the policy, adapter disabled"},
        "machine": machine.to_dict(),
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "gemm": gemm,
        "best_trl_variant": best_trl,
        "speedup_vs_best_trl": ratio("cpuft", best_trl, "tokens_per_second") if best_trl else None,
        "peak_rss_ratio_vs_best_trl": ratio("cpuft", best_trl, "peak_rss_bytes") if best_trl else None,
        # The headline: cpuft / trl_best, non-padding tokens/s (both sequences of every pair).
        "speedup_vs_trl_best": ratio("cpuft", "trl_best", "tokens_per_second"),
        "peak_rss_ratio_vs_trl_best": ratio("cpuft", "trl_best", "peak_rss_bytes"),
        # Held-out reward accuracy, cpuft minus trl_best (a share: +0.05 is 5 points better).
        "reward_accuracy_diff_vs_trl_best": accuracy_diff("cpuft", "trl_best"),
        "speedup_vs_trl_defaults": ratio("cpuft", "trl_defaults", "tokens_per_second"),
        "peak_rss_ratio_vs_trl_defaults": ratio("cpuft", "trl_defaults", "peak_rss_bytes"),
        "reward_accuracy_diff_vs_trl_defaults": accuracy_diff("cpuft", "trl_defaults"),
        "bf16_speedup_vs_fp32": ratio(*_cpuft_runs_by_dtype(variants), "tokens_per_second"),
        "cpuft_compute_dtype_reason": variants.get("cpuft", {}).get("compute_dtype_reason"),
        "cpuft_mfu_vs_measured_gemm": variants.get("cpuft", {}).get("mfu_vs_measured_gemm"),
        "cpuft_planned_vs_measured_train_seconds": _plan_ratio(variants.get("cpuft")),
        "variants": variants,
    }


def with_fastest_trl_best(variants: dict) -> tuple[dict, dict[str, float]]:
    """(`variants` with trl_best the fastest of its per-micro-batch runs (`trl_best_mbN`, from
    --trl-micro-batches; its record names the run in `variant_run`), {run: median tokens/s});
    `variants` unchanged and {} without such runs."""
    sized = {name: run for name, run in variants.items() if name.startswith(TRL_BEST_AT)}
    if not sized:
        return variants, {}
    fastest = max(sized, key=lambda name: sized[name]["tokens_per_second"])
    trl_best = {**sized[fastest], "variant": TRL_BEST, "variant_run": fastest}
    return {**variants, TRL_BEST: trl_best}, {name: run["tokens_per_second"] for name, run in sized.items()}


def _cpuft_runs_by_dtype(variants: dict) -> tuple[str | None, str | None]:
    """(cpuft's run in bf16, its run in fp32): the forced variants where they ran, else cpuft itself
    in the dtype its plan chose; None for a dtype no cpuft run used."""
    def run_in(dtype: str, forced: str) -> str | None:
        if forced in variants:
            return forced
        return "cpuft" if variants.get("cpuft", {}).get("compute_dtype") == dtype else None

    return run_in("bf16", CPUFT_BF16), run_in("fp32", CPUFT_FP32)


def _plan_ratio(run: dict | None) -> float | None:
    if not run or not run.get("planned_train_seconds") or not run.get("train_seconds"):
        return None
    return run["planned_train_seconds"] / run["train_seconds"]


def write_bench_chart(report: dict, path: Path) -> None:
    """Two panels: non-padding tokens/s (with the ratio to cpuft and MFU) and peak RSS."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["variants"])
    runs = [report["variants"][n] for n in names]
    colors = ["#2a7ab9" if n.startswith("cpuft") else "#999999" for n in names]
    fig, (speed_ax, rss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=100)
    speeds = [r["tokens_per_second"] for r in runs]
    bars = speed_ax.bar(names, speeds, color=colors)
    cpuft_speed = report["variants"].get("cpuft", {}).get("tokens_per_second")
    for bar, run in zip(bars, runs):
        label = f"{run['tokens_per_second']:.0f}"
        if cpuft_speed:
            label += f"\ncpuft {cpuft_speed / run['tokens_per_second']:.2f}x"
        if run.get("mfu_vs_measured_gemm") is not None:
            label += f"\nMFU {run['mfu_vs_measured_gemm']:.0%}"
        speed_ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
    speed_ax.set_ylabel("non-padding tokens / s")
    speed_ax.set_ylim(0, max(speeds) * 1.35)
    title = f"{report['size']}: {report['model']['total_params'] / 1e6:.1f}M params, {report['steps']} steps"
    if report.get("speedup_vs_best_trl") is not None:
        title += f"\ncpuft {report['speedup_vs_best_trl']:.2f}x the fastest TRL ({report['best_trl_variant']})"
    speed_ax.set_title(title, fontsize=10)
    rss = [r["peak_rss_bytes"] / 2**20 for r in runs]
    rss_ax.bar(names, rss, color=colors)
    for x, value in enumerate(rss):
        rss_ax.annotate(f"{value:.0f}", (x, value), ha="center", va="bottom", fontsize=8)
    rss_ax.set_ylabel("peak RSS (MiB)")
    rss_ax.set_ylim(0, max(rss) * 1.2)
    for ax in (speed_ax, rss_ax):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    save_figure(fig, path)


def format_bench_table(report: dict) -> str:
    if report.get("job") == "dpo":
        return format_dpo_table(report)
    head = f"{'variant':<14} {'dtype':<6} {'ckpt':<5} {'tok/s':>8} {'step s':>7} {'pad %':>6} {'RSS MiB':>8} {'eval loss':>9} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for name, run in report["variants"].items():
        mfu = run.get("mfu_vs_measured_gemm")
        lines.append(
            f"{name:<14} {run['compute_dtype']:<6} {'on' if run['gradient_checkpointing'] else 'off':<5}"
            f" {run['tokens_per_second']:>8.0f} {run['median_step_seconds']:>7.2f}"
            f" {100 * (run['padding_fraction'] or 0):>6.1f} {run['peak_rss_bytes'] / 2**20:>8.0f}"
            f" {run['eval_loss']:>9.4f} {'' if mfu is None else f'{mfu:.1%}':>6}"
        )
    gemm = report["gemm"]["fp32"]
    lines.append(f"\nmeasured GEMM peak (fp32, {gemm['m']}x{gemm['k']}x{gemm['n']}, {gemm['threads']} threads):"
                 f" {gemm['flops_per_second'] / 1e9:.1f} GFLOP/s")
    if report.get("speedup_vs_best_trl") is not None:
        lines.append(f"{'speedup_vs_best_trl':<34} {report['speedup_vs_best_trl']:.2f}x"
                     f"  (fastest TRL variant: {report['best_trl_variant']})")
    if report.get("trl_best_run"):
        lines.append(f"{'trl_best':<34} {report['trl_best_run']}, the fastest of"
                     f" {', '.join(report['trl_best_tokens_per_second_by_run'])}")
    if report.get("cpuft_compute_dtype_reason"):
        lines.append(f"{'cpuft dtype':<34} {report['cpuft_compute_dtype']}: {report['cpuft_compute_dtype_reason']}")
    if report.get("cpuft_planned_vs_measured_train_seconds"):
        cpuft = report["variants"]["cpuft"]
        lines.append(f"{'time plan vs measured (cpuft)':<34} {cpuft['planned_train_seconds']:.0f} s planned,"
                     f" {cpuft['train_seconds']:.0f} s trained: {report['cpuft_planned_vs_measured_train_seconds']:.2f}x")
    for key in ("eval_loss_rel_diff_vs_best_trl", "peak_rss_ratio_vs_best_trl", "speedup_vs_trl_tuned", "speedup_vs_trl_defaults", "eval_loss_rel_diff_vs_trl_tuned",
                "peak_rss_ratio_vs_trl_tuned", "bf16_speedup_vs_fp32"):
        if report.get(key) is not None:
            value = report[key]
            lines.append(f"{key:<34} {value:+.2%}" if "diff" in key else f"{key:<34} {value:.2f}x")
    return "\n".join(lines)


def format_dpo_table(report: dict) -> str:
    """The console table of a `--job dpo` bench, then its ratios."""
    head = (f"{'variant':<12} {'dtype':<5} {'ckpt':<4} {'sampling':<15} {'tok/s':>7} {'step s':>7} {'pad %':>6}"
            f" {'RSS MiB':>8} {'reward acc':>10} {'margin':>7} {'MFU':>6}")
    title = (f"DPO: {report['train_pairs']} pairs ({report['steps']} steps x {report['batch_size']} pairs"
             f" x {report['accumulation']}), held-out {report['eval_pairs']} pairs; tokens = prompt+chosen and"
             " prompt+rejected, padding excluded")
    lines = [title, head, "-" * len(head)]
    for name, run in report["variants"].items():
        mfu = run.get("mfu_vs_measured_gemm")
        lines.append(
            f"{name:<12} {run['compute_dtype']:<5} {'on' if run['gradient_checkpointing'] else 'off':<4}"
            f" {run['sampling']:<15} {run['tokens_per_second']:>7.0f} {run['median_step_seconds']:>7.2f}"
            f" {100 * (run['padding_fraction'] or 0):>6.1f} {run['peak_rss_bytes'] / 2**20:>8.0f}"
            f" {run['eval_reward_accuracy']:>10.3f} {run['eval_reward_margin']:>7.3f}"
            f" {'' if mfu is None else f'{mfu:.1%}':>6}"
        )
    lines.append("")
    for key in ("speedup_vs_trl_best", "peak_rss_ratio_vs_trl_best", "reward_accuracy_diff_vs_trl_best",
                "speedup_vs_trl_defaults", "peak_rss_ratio_vs_trl_defaults", "reward_accuracy_diff_vs_trl_defaults",
                "bf16_speedup_vs_fp32"):
        if report.get(key) is not None:
            value = report[key]
            lines.append(f"{key:<38} {value:+.3f}" if "diff" in key else f"{key:<38} {value:.2f}x")
    if report.get("cpuft_planned_vs_measured_train_seconds"):
        cpuft = report["variants"]["cpuft"]
        lines.append(f"{'time plan vs measured (cpuft dpo)':<38} {cpuft['planned_train_seconds']:.0f} s planned,"
                     f" {cpuft['train_seconds']:.0f} s trained: {report['cpuft_planned_vs_measured_train_seconds']:.2f}x")
    return "\n".join(lines)
