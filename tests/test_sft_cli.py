"""`cpuft sft` and `cpuft env` end to end, through the real CLI in a subprocess, on the tiny model."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cpuft
from tests.conftest import run_cpuft, write_jsonl

FAST = ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "1", "--max-length", "128", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    result = run_cpuft(
        "sft", "--model", tiny_model_dir, "--dataset", "sample", "--max-steps", "30",
        "--learning-rate", "1e-2", "--save-steps", "10", "--output-dir", run_dir, *FAST,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_run_directory_holds_every_artefact(trained_run):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja", "config.yaml", "plan.json", "metrics.jsonl", "loss_curve.png",
                 "summary.json", "checkpoint-30"):
        assert (trained_run / name).exists(), name
    assert any((trained_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert not list(trained_run.glob(".*tmp*")), "temporary files left behind"


def test_summary_figures_are_plausible(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == summary["max_steps"] == 30
    assert summary["device"] == "cpu"
    sample_rows = len((Path(cpuft.__file__).parent / "data" / "lima_sample.jsonl").read_text().splitlines())
    assert summary["train_rows"] + summary["eval_rows"] == sample_rows and summary["eval_rows"] > 0
    assert summary["train_tokens"] > 0 and summary["train_tokens_per_second"] > 0
    assert summary["peak_rss_bytes"] > 50 * 2**20
    assert 0 < summary["mfu"] < 1
    # LoRA r=16 on every linear layer but the head: r * (in + out) per layer. Per block of the
    # test model (hidden 64, 2 of 4 heads for k/v so 32 wide, MLP 192): q, o 64->64; k, v 64->32;
    # gate, up 64->192; down 192->64. 16 * (2*128 + 2*96 + 3*256) = 19,456; two blocks.
    assert summary["trainable_params"] == 2 * 19_456
    assert summary["trainable_params"] < summary["total_params"]
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0


def test_trained_tokens_are_the_non_padding_tokens_of_the_data(tiny_model_dir, tmp_path):
    """train_tokens counted here from the dataset: every row through the chat template, cut at
    max_length; 4 steps of 4 rows over 8 rows are exactly two epochs."""
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * (i * i)},
                          {"role": "assistant", "content": "Because of Rayleigh scattering. " * (i + 1)}]}
            for i in range(8)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_dir = tmp_path / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", data, "--eval-fraction", "0",
                       "--max-steps", "4", "--per-device-batch-size", "4", "--gradient-accumulation-steps", "1",
                       "--max-length", "64", "--save-steps", "100", "--output-dir", run_dir, "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert min(lengths) < 64 < max(lengths), "the rows should exercise both sides of truncation"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_rows"] == 8
    assert summary["train_tokens"] == 2 * sum(min(n, 64) for n in lengths)
    logged = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == [1, 2, 3, 4]
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_falls_over_the_run(trained_run):
    logged = [r for r in map(json.loads, (trained_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 31))  # logging_steps defaults to 1
    losses = [r["loss"] for r in logged]
    # The 64-wide random test model with frozen tied embeddings can only shift logits a little
    # (RMSNorm bounds the hidden state), so the drop is modest; step-to-step noise is ~0.03.
    start = statistics.mean(losses[:5])
    assert statistics.mean(losses[-5:]) < start - 0.05
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["eval_loss"] < start


def test_plan_json_records_machine_and_plan(trained_run):
    plan = json.loads((trained_run / "plan.json").read_text())
    assert plan["plan"]["device"] == "cpu"
    assert plan["plan"]["per_device_batch_size"] == 4 and plan["plan"]["gradient_accumulation_steps"] == 1
    assert plan["machine"]["physical_cores"] >= 1


def test_adapter_loads_in_stock_peft_and_generates(trained_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    model = PeftModel.from_pretrained(base, trained_run / "adapter")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I water tomatoes?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        adapted = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert not torch.allclose(adapted, plain), "the adapter changes nothing"


def test_existing_run_is_not_overwritten(trained_run, tiny_model_dir):
    before = (trained_run / "summary.json").read_bytes()
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--output-dir", trained_run, "--max-steps", "2")
    assert result.returncode == 2
    assert "already holds files" in result.stderr and "--resume" in result.stderr
    assert (trained_run / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--dataset", "{tmp}/missing.jsonl"], "does not exist"),
        (["--dataset", "{tmp}/bad.jsonl"], "bad.jsonl:2: field 'messages[1]'.role is 'robot'"),
        (["--config", "{tmp}/job.yaml"], "unknown config key 'lora_rank'. Did you mean 'lora_r'?"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--model", "{tmp}/no-model"], "cannot load model config"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, tiny_model_dir, extra, fragment):
    write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
    ])
    (tmp_path / "job.yaml").write_text("max_steps: 3\nlora_rank: 8\n")
    args = ["sft", "--model", str(tiny_model_dir), "--dataset", "sample", "--output-dir", str(tmp_path / "out")]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = run_cpuft(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_without_writing(tmp_path, tiny_model_dir):
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--output-dir", tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compute_dtype" in result.stdout and "dry run" in result.stdout
    assert not (tmp_path / "out").exists()


def test_sigterm_checkpoints_and_resume_finishes(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpuft", "sft", "--model", str(tiny_model_dir), "--dataset", "sample",
         "--max-steps", "400", "--save-steps", "1000", "--output-dir", str(run_dir), *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["status"] == "interrupted" and 2 <= stopped_at < 400
    assert (run_dir / f"checkpoint-{stopped_at}").is_dir()
    assert not (run_dir / "adapter").exists()

    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--max-steps", str(stopped_at + 3), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == stopped_at + 3 and summary["steps_this_run"] == 3
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, stopped_at + 4)), "each step logged exactly once across the two processes"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_without_a_run_directory_is_bad_input(tmp_path):
    result = run_cpuft("sft", "--output-dir", tmp_path / "nothing", "--resume")
    assert result.returncode == 2 and "not a cpuft run directory" in result.stderr


def test_env_plans_for_a_described_machine(tmp_path):
    machine = {"machine": {"cpu_name": "Xeon", "cpu_flags": ["amx_bf16", "avx512_bf16", "avx512_f", "avx2"],
                           "physical_cores": 44, "logical_cores": 88, "usable_cpus": 88, "cpu_max_mhz": 3000}}
    (tmp_path / "c3.json").write_text(json.dumps(machine))
    result = run_cpuft("env", "--machine", tmp_path / "c3.json")
    assert result.returncode == 0, result.stderr
    assert "bf16" in result.stdout and "AMX" in result.stdout and "44" in result.stdout
