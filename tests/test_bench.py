"""`cpuft bench --size tiny`: the smoke test of the benchmark (no timing asserts: CI is noisy)."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import run_cpuft


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_cpuft("bench", "--size", "tiny", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


@pytest.mark.slow
def test_bench_reports_three_variants_with_ratios(tiny_bench):
    out, proc = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    assert {"trl_defaults", "trl_tuned", "cpuft"} <= set(report["variants"])
    for key in ("speedup_vs_trl_tuned", "speedup_vs_trl_defaults", "eval_loss_rel_diff_vs_trl_tuned",
                "peak_rss_ratio_vs_trl_tuned", "cpuft_mfu_vs_measured_gemm"):
        assert isinstance(report[key], float) and report[key] == report[key], key  # a number, not NaN
    cpuft, tuned = report["variants"]["cpuft"], report["variants"]["trl_tuned"]
    # A random-init model predicts close to uniformly over its vocabulary, and two small LoRA
    # steps barely move it: held-out cross-entropy must be about ln(vocab) nats for every variant.
    uniform = math.log(report["model"]["vocab_size"])
    for run in report["variants"].values():
        assert run["steps"] == 2
        assert run["peak_rss_bytes"] > 0
        assert abs(run["eval_loss"] - uniform) < 0.1, (run["variant"], run["eval_loss"], uniform)
    # cpuft's length-grouped batches hold no more padding than TRL's random ones.
    assert cpuft["padding_fraction"] <= tuned["padding_fraction"]
    assert report["gemm"]["fp32"]["flops_per_second"] > 0
    assert "speedup_vs_trl_tuned" in proc.stdout


@pytest.mark.slow
def test_every_variant_trains_exactly_the_non_padding_tokens_of_its_data(tiny_bench):
    """Counted here from the bench's own train.jsonl: each conversation through the model's chat
    template, cut at max_length; the bench runs exactly one epoch of those rows."""
    from transformers import AutoTokenizer

    out, _ = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "work" / f"model-{report['size']}")
    rows = [json.loads(line) for line in (out / "work" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == report["steps"] * report["batch_size"] * report["accumulation"]
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert max(lengths) > report["max_length"], "the synthetic long tail should exercise truncation"
    expected = sum(min(n, report["max_length"]) for n in lengths)
    for name, run in report["variants"].items():
        assert run["train_tokens"] == expected, name
        assert run["epochs"] == pytest.approx(1.0), name  # packed rows too: one pass, not 1.5


@pytest.mark.slow
def test_bench_variants_differ_only_where_they_should(tiny_bench):
    out, _ = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    native_bf16 = report["machine"]["cpu_summary"].startswith(("AMX", "AVX-512 with BF16"))
    defaults, tuned, cpuft = (report["variants"][v] for v in ("trl_defaults", "trl_tuned", "cpuft"))
    assert defaults["compute_dtype"] == "bf16" and defaults["gradient_checkpointing"]  # TRL's defaults
    assert tuned["compute_dtype"] == ("bf16" if native_bf16 else "fp32") and not tuned["gradient_checkpointing"]
    assert not cpuft["gradient_checkpointing"]
    if native_bf16 and "so the machine was busy" not in cpuft["compute_dtype_reason"]:
        # A model this small: the plan timed a micro-batch in each dtype and kept the faster.
        assert cpuft["compute_dtype_reason"].startswith("auto: measured at")
        assert f"; {cpuft['compute_dtype']}, " in cpuft["compute_dtype_reason"]
        assert report["cpuft_compute_dtype"] == cpuft["compute_dtype"]
    elif native_bf16:  # too busy to tell the dtypes apart: the fixed rule
        assert cpuft["compute_dtype"] == "bf16"
    else:
        assert cpuft["compute_dtype"] == "fp32"
    assert len({run["trainable_params"] for run in report["variants"].values()}) == 1  # same LoRA everywhere


@pytest.mark.slow
def test_trl_best_packs_padding_free_and_trains_the_same_rows(tiny_bench):
    out, proc = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    best, tuned = report["variants"]["trl_best"], report["variants"]["trl_tuned"]
    assert best["packing"] and best["padding_free"] and not best["gradient_checkpointing"]
    assert best["optimizer"] == "adamw_torch_fused" == report["variants"]["cpuft"]["optimizer"]
    assert best["compute_dtype"] == tuned["compute_dtype"]
    # Padding-free rows pad only to a multiple, far less than TRL's random unpacked batches.
    assert best["padding_fraction"] < tuned["padding_fraction"]
    # Packed rows are fuller, so it takes no more optimizer steps than the bench's 2 for one epoch.
    assert 1 <= best["steps"] <= 2
    assert "trl_best" in proc.stdout


@pytest.mark.slow
def test_speedup_vs_best_trl_names_the_fastest_trl_run(tiny_bench):
    """Checked against each worker's own result file, not bench.json's derived numbers."""
    out, proc = tiny_bench
    report = json.loads((out / "bench.json").read_text())
    measured = {v: json.loads((out / "work" / f"result-{v}.json").read_text())["tokens_per_second"]
                for v in ("trl_defaults", "trl_tuned", "trl_best")}
    fastest = max(measured, key=measured.get)
    assert report["best_trl_variant"] == fastest
    # Against the fastest peer cpuft's ratio is the smallest of its ratios to TRL variants.
    for other in measured:
        ratio_to_other = report["variants"]["cpuft"]["tokens_per_second"] / measured[other]
        assert report["speedup_vs_best_trl"] <= ratio_to_other * (1 + 1e-9), other
    assert report["speedup_vs_trl_tuned"] is not None  # the old keys stay
    assert f"fastest TRL variant: {fastest}" in proc.stdout


@pytest.mark.slow
def test_trl_best_at_each_micro_batch_trains_the_same_rows_and_the_fastest_is_trl_best(tmp_path):
    """--trl-micro-batches: one trl_best run per size, each the same packed rows per optimizer step
    (accumulation makes up the rest); the ratios are against the fastest, checked against each
    worker's own result file."""
    out = tmp_path / "bench"
    proc = run_cpuft("bench", "--size", "tiny", "--steps", "2", "--variants", "trl_best,cpuft",
                     "--trl-micro-batches", "1,2", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    runs = {name: json.loads((out / "work" / f"result-{name}.json").read_text()) for name in ("trl_best_mb1", "trl_best_mb2")}
    assert [runs[n]["batch_size"] for n in runs] == [1, 2]
    # The same packed rows per optimizer step (at micro-batch 1 all accumulation), rounded up to a whole micro-batch.
    rows_per_step = runs["trl_best_mb1"]["accumulation"]
    assert runs["trl_best_mb2"]["accumulation"] == math.ceil(rows_per_step / 2)
    assert len({run["train_tokens"] for run in runs.values()}) == 1 and all(run["epochs"] == pytest.approx(1.0) for run in runs.values())
    fastest = max(runs, key=lambda name: runs[name]["tokens_per_second"])
    assert report["trl_best_run"] == fastest and report["trl_best_micro_batch"] == runs[fastest]["batch_size"]
    assert report["variants"]["trl_best"]["tokens_per_second"] == runs[fastest]["tokens_per_second"]
    cpuft = report["variants"]["cpuft"]["tokens_per_second"]
    assert report["speedup_vs_trl_best"] == pytest.approx(cpuft / runs[fastest]["tokens_per_second"])
    assert report["speedup_vs_best_trl"] == report["speedup_vs_trl_best"]  # trl_best is the only TRL variant
    assert "--trl-micro-batches 1,2" in report["command"] and f"{fastest}, the fastest of" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["--trl-micro-batches", "1,two"], "takes sizes separated by commas"),
    (["--trl-micro-batches", "0,2"], "distinct sizes of at least 1"),
    (["--variants", "cpuft", "--trl-micro-batches", "1,2"], "which --variants cpuft leaves out"),
    (["--job", "dpo", "--trl-micro-batches", "1,2"], "DPOTrainer has no packing"),
])
def test_bad_trl_micro_batches_are_refused_before_anything_runs(args, message, tmp_path):
    proc = run_cpuft("bench", *args, "--out", tmp_path / "bench")
    assert proc.returncode == 2 and "--trl-micro-batches" in proc.stderr and message in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bench").exists()


def test_the_3m_size_has_about_3m_parameters():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpuft.bench.sizes import SIZES

    spec = SIZES["3m"].model
    config = LlamaConfig(vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                         num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                         num_key_value_heads=spec.num_kv_heads, tie_word_embeddings=True)  # as build_tiny_model
    with torch.device("meta"):
        params = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    assert 2.5e6 < params < 3.5e6, params


@pytest.mark.parametrize("size, published_params", [
    # Hub model pages (safetensors parameter counts): Qwen2.5-0.5B 494,032,768; Llama-3.2-1B 1,235,814,400.
    ("qwen0.5b", 494_032_768),
    ("llama1b", 1_235_814_400),
])
def test_published_shape_sizes_have_the_published_parameter_count(size, published_params):
    import torch
    from transformers import AutoModelForCausalLM

    from cpuft.bench.sizes import SIZES

    with torch.device("meta"):  # shapes only: no memory, no init time
        model = AutoModelForCausalLM.from_config(SIZES[size].model.config())
    params = sum(p.numel() for p in model.parameters())  # tied embeddings counted once
    assert abs(params - published_params) / published_params < 0.01, params
    assert model.get_output_embeddings().weight.shape[0] in (151_936, 128_256)  # full vocabulary


@pytest.mark.slow
def test_bench_writes_a_chart(tiny_bench):
    out, _ = tiny_bench
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rejects_unknown_variant(tmp_path):
    proc = run_cpuft("bench", "--variants", "cpuft,trl_fast", "--out", tmp_path)
    assert proc.returncode == 2
    assert "trl_fast" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bench.json").exists()


def test_dpo_bench_trains_both_variants_on_the_same_pairs_and_reports_reward_accuracy(tmp_path):
    """`--job dpo` at the tiny size: cpuft dpo's stages against plain TRL DPOTrainer (trl_best).
    The token count is recomputed here from the bench's own train.jsonl with the model's chat
    template: both sequences of every pair (prompt + chosen, prompt + rejected), each cut at
    max_length, one pass over the pairs."""
    from transformers import AutoTokenizer

    out = tmp_path / "bench"
    proc = run_cpuft("bench", "--job", "dpo", "--size", "tiny", "--steps", "2", "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["job"] == "dpo" and set(report["variants"]) == {"trl_best", "cpuft"}
    for key in ("speedup_vs_trl_best", "peak_rss_ratio_vs_trl_best", "reward_accuracy_diff_vs_trl_best"):
        assert isinstance(report[key], float) and report[key] == report[key], key  # a number, not NaN
    assert "speedup_vs_trl_best" in proc.stdout and "reward acc" in proc.stdout

    pairs = [json.loads(line) for line in (out / "work" / "train.jsonl").read_text().splitlines()]
    assert len(pairs) == report["train_pairs"] == report["steps"] * report["batch_size"] * report["accumulation"]
    tokenizer = AutoTokenizer.from_pretrained(out / "work" / f"model-{report['size']}")

    def tokens(messages):
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        return min(len(ids), report["max_length"])

    expected = sum(tokens(p["prompt"] + p["chosen"]) + tokens(p["prompt"] + p["rejected"]) for p in pairs)
    best, cpuft = report["variants"]["trl_best"], report["variants"]["cpuft"]
    for run in (best, cpuft):
        assert run["steps"] == 2 and run["epochs"] == pytest.approx(1.0)
        assert run["train_tokens"] == expected, run["variant"]
        assert 0.0 <= run["eval_reward_accuracy"] <= 1.0 and run["eval_pairs"] == report["eval_pairs"] == 8
        assert run["peak_rss_bytes"] > 0
    # The same batch in pairs, LoRA, optimizer and reference (a forward each step) for both.
    for key in ("batch_size", "accumulation", "trainable_params", "optimizer",
                "precompute_ref_log_probs", "beta", "loss_type"):
        assert best[key] == cpuft[key], key
    # The dtype: TRL's best takes bf16 wherever it is native; cpuft's plan may have measured fp32
    # the faster at this size (cpuft.planning.dtype_choice), and then says so.
    assert best["weights_dtype"] == best["compute_dtype"] and cpuft["weights_dtype"] == cpuft["compute_dtype"]
    if cpuft["compute_dtype"] != best["compute_dtype"]:
        assert cpuft["compute_dtype"] == "fp32" and "measured" in cpuft["compute_dtype_reason"]
    assert best["sampling"] == "group_by_length" and not best["gradient_checkpointing"]
    assert not cpuft["precompute_ref_log_probs"]  # one pass over the pairs: the plan keeps the reference forward


def test_dpo_bench_rejects_an_sft_only_variant_before_writing(tmp_path):
    proc = run_cpuft("bench", "--job", "dpo", "--variants", "trl_tuned,cpuft", "--out", tmp_path / "out")
    assert proc.returncode == 2
    assert "trl_tuned" in proc.stderr and "--job dpo" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
