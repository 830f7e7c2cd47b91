"""The time plan from measured step parts (cpuft.planning.cloud, cpuft.planning.step_cost).

No timed asserts: the machine is shared, so a planned-vs-measured factor would be flaky. The
arithmetic is checked on hand-computed inputs; the measurement is checked for what can be seen
from outside (it runs at the model's shapes, it is cached on disk and reused), and `cpuft sft`'s
header is checked to show the parts. The ±30 % validation is a bench figure (docs/speed.md).
"""

from __future__ import annotations

import json

import pytest

from cpuft.planning.step_cost import StepCosts
from cpuft.planning.cloud import micro_batch_shape, run_seconds_from_parts
from cpuft.planning.memory import RunSettings
from tests.conftest import random_chat_rows, run_cpuft, write_jsonl

COSTS = StepCosts(rows=4, seq_len=128, num_layers=2, layer_forward_seconds=0.1, layer_backward_seconds=0.2,
                  head_seconds_per_token=0.001, other_seconds=0.05, optimizer_seconds=0.01, measured_rows=4,
                  measure_seconds=1.0, source="hand-written")


def test_run_seconds_add_up_the_parts():
    seconds, parts = run_seconds_from_parts(COSTS, micro_batches=10, optimizer_steps=5, gradient_checkpointing=False,
                                            head_tokens=100, allreduce_seconds_per_step=0.02)
    # 10 x 2 layers x (0.1 + 0.2) = 6; 10 x 100 tokens x 1 ms = 1; 10 x 0.05 = 0.5; 5 x 0.01; 5 x 0.02.
    assert parts == pytest.approx({"decoder layers": 6.0, "lm_head + loss": 1.0, "other": 0.5,
                                   "optimizer": 0.05, "all-reduce": 0.1})
    assert seconds == pytest.approx(7.65)


def test_checkpointing_adds_one_forward_per_layer_and_length_scales_the_layers():
    seconds, parts = run_seconds_from_parts(COSTS, 10, 5, gradient_checkpointing=True, head_tokens=100)
    assert parts["decoder layers"] == pytest.approx(10 * 2 * (0.1 + 0.1 + 0.2))  # 8
    assert parts["all-reduce"] == 0.0  # one process
    assert seconds == pytest.approx(8 + 1 + 0.5 + 0.05)
    _, half = run_seconds_from_parts(COSTS, 10, 5, gradient_checkpointing=False, head_tokens=100, length_scale=0.5)
    assert half["decoder layers"] == pytest.approx(3.0) and half["other"] == pytest.approx(0.25)
    assert half["lm_head + loss"] == pytest.approx(1.0)  # the head follows head_tokens, not the padded length


def test_micro_batch_shape_pads_grouped_rows_and_fills_packed_ones():
    settings = RunSettings(batch_size=4, seq_len=512)
    rows, length = micro_batch_shape(settings, mean_seq_len=88.0, packed=False)
    assert rows == 4 and length == pytest.approx(100.0)  # 88 / (1 - 12 % padding)
    assert micro_batch_shape(settings, mean_seq_len=500.0, packed=False)[1] == 512  # never past max_length
    assert micro_batch_shape(settings, mean_seq_len=88.0, packed=True) == (4, 512.0)


def _planned(model_dir, **keys):
    """The preflight `cpuft sft` runs for a job on `model_dir` with `keys`, on this machine."""
    from cpuft.config.job import SFTJobConfig
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.preflight import preflight

    return preflight(SFTJobConfig(model=str(model_dir), **keys), probe_machine())


def test_step_costs_are_measured_at_the_models_shapes_and_cached(tiny_model_dir, tmp_path, monkeypatch):
    from cpuft.planning.step_cost import cache_dir, step_costs

    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    checked = _planned(tiny_model_dir, dtype="fp32", lora_r=8, lora_dropout=0.05, threads=1, attn_implementation="sdpa")
    config, settings, plan = checked.model_config, checked.run_settings, checked.plan
    assert (settings.compute_dtype, settings.lora_r, plan.threads) == ("fp32", 8, 1)
    first = step_costs(config, settings, plan, rows=4, seq_len=64)
    assert first.num_layers == config.num_hidden_layers
    assert (first.rows, first.seq_len) == (4, 64)
    assert first.layer_forward_seconds + first.layer_backward_seconds > 0
    assert first.head_seconds_per_token > 0 and first.optimizer_seconds > 0
    [entry] = list(cache_dir().glob("*.json"))
    assert json.loads(entry.read_text())["key"]["seq_len"] == 64
    stamp = entry.stat().st_mtime_ns
    assert step_costs(config, settings, plan, rows=4, seq_len=64) == first  # read back, not measured again
    assert entry.stat().st_mtime_ns == stamp
    step_costs(config, settings, plan, rows=4, seq_len=96)  # another shape: another measurement
    assert len(list(cache_dir().glob("*.json"))) == 2


@pytest.mark.slow
def test_sft_header_shows_the_measured_parts_and_the_summary_keeps_the_plan(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", random_chat_rows(0, 8, 24, count=12))
    run_dir = tmp_path / "run"
    proc = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", data, "--max-steps", "3",
                     "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1", "--eval-fraction", "0",
                     "--max-length", "64", "--no-progress", "--output-dir", run_dir,
                     timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    assert "measured       measured on this machine: llama layer at" in out
    assert "micro-batch    2 x" in out and "layers x" in out and "lm_head/loss" in out
    assert "3 micro-batches, 3 optimizer steps" in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["planned_train_seconds"] > 0


@pytest.mark.parametrize("name", ["gpt_neox", "opt", "bloom", "falcon"])
def test_step_costs_find_the_decoder_layers_of_families_without_model_dot_layers(name, tmp_path, monkeypatch):
    # GPT-NeoX keeps its blocks in gpt_neox.layers, OPT in model.decoder.layers, BLOOM and Falcon
    # in transformer.h: the time plan used to fail on them and fall back to the FLOP count.
    from cpuft.planning.step_cost import measure_step_costs
    from cpuft.testing.architectures import build_architecture

    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path / "cache"))
    checked = _planned(build_architecture(name, tmp_path / name), dtype="fp32", lora_r=4, lora_dropout=0.0,
                       threads=1, attn_implementation="eager")
    costs = measure_step_costs(checked.model_config, checked.run_settings, checked.plan, rows=2, seq_len=32)
    assert costs.num_layers == checked.model_config.num_hidden_layers
    assert costs.layer_forward_seconds > 0 and costs.layer_backward_seconds > 0
    assert costs.optimizer_seconds > 0  # the first block's LoRA tensors were found by their path
