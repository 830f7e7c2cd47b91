"""`cpuft bench`: the same LoRA SFT job run by plain TRL and by cpuft, each in its own process,
reported as ratios within one run.

Modules, in the order a bench runs:
- sizes: the fixed job (model shape, steps, batch, lengths) per --size, the variants, and the
  optimizer and LoRA settings every variant shares;
- data: the synthetic LIMA-shaped conversations (or the user's --dataset) as train/eval files;
- orchestrator: `run_bench(BenchOptions)`, which runs the GEMM measurement and every variant;
- worker: the `python -m cpuft.bench.worker SPEC` protocol, one variant per process;
- baselines: the plain TRL trainers (defaults, and tuned by hand);
- measure: training one variant and measuring it (tokens/s, step time, padding, RSS, losses);
- report: bench.json (medians over repeats, MFU, ratios), bench.png and the console table.
"""
