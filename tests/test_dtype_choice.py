"""`--dtype auto` on a CPU with native bf16: the faster of one micro-batch timed in each dtype
(cpuft.planning.dtype_choice), and the runs that keep the fixed rule without timing anything.

The decision is checked on hand-made timings; the measurement on this machine's own CPU where it
has native bf16 (no timed asserts: only that the reason names both measured figures and the plan
took the faster), and the cases that must never measure on synthetic machines, by what they leave
in the step-cost cache: nothing.
"""

from __future__ import annotations

import json

import pytest

from cpuft.hardware.probe import Machine, probe_machine
from cpuft.planning.dtype_choice import (
    MAX_BELIEVABLE_GAP,
    MEASURED_DTYPE_MAX_LINEAR_PARAMS,
    faster_dtype,
    micro_batch_seconds,
    unbelievable_gap,
)
from cpuft.planning.step_cost import StepCosts
from tests.conftest import run_cpuft

GIB = 2**30
NATIVE_BF16 = probe_machine().native_bf16
COOPER_LAKE = Machine(  # AVX-512-BF16 without AMX
    cpu_name="Intel(R) Xeon(R) Platinum 8380H", cpu_flags=frozenset({"avx512_bf16", "avx512_f", "avx2", "fma3"}),
    physical_cores=2, logical_cores=4, usable_cpus=4, ram_bytes=64 * GIB,
)
# What the reason says when the two timings differ more than any dtype explains (a busy machine).
BUSY_MACHINE = "so the machine was busy"
AVX2_ONLY = Machine(
    cpu_name="AMD EPYC", cpu_flags=frozenset({"avx2", "fma3"}),
    physical_cores=2, logical_cores=2, usable_cpus=2, ram_bytes=24 * GIB, torch_cpu_isa="AVX2",
)


def costs(forward: float, backward: float, head_per_token: float = 0.0, other: float = 0.0,
          rows: int = 4, seq_len: int = 128, layers: int = 2) -> StepCosts:
    return StepCosts(rows=rows, seq_len=seq_len, num_layers=layers, layer_forward_seconds=forward,
                     layer_backward_seconds=backward, head_seconds_per_token=head_per_token, other_seconds=other,
                     optimizer_seconds=0.5, measured_rows=rows, measure_seconds=1.0, source="hand-written")


def test_micro_batch_seconds_add_layers_head_and_the_rest_but_not_the_optimizer():
    # 2 layers x (0.03 + 0.05) + 4 x 128 tokens x 0.1 ms + 0.01; the 0.5 s optimizer step is left out.
    assert micro_batch_seconds(costs(0.03, 0.05, 1e-4, 0.01)) == pytest.approx(0.16 + 0.0512 + 0.01)
    # Checkpointing runs each layer's forward twice.
    assert micro_batch_seconds(costs(0.03, 0.05), gradient_checkpointing=True) == pytest.approx(2 * 0.11)


def test_the_faster_dtype_is_chosen_and_the_reason_names_both_figures():
    fp32, bf16 = costs(0.04, 0.06, other=0.01), costs(0.06, 0.09)  # 0.21 s against 0.30 s
    dtype, why = faster_dtype(fp32, bf16, cpu="this CPU")
    assert dtype == "fp32"
    assert why.startswith("auto: measured at 4 x 128 on this CPU: fp32 0.21 s vs bf16 0.3 s per micro-batch; fp32")
    assert "1.43x faster" in why
    dtype, why = faster_dtype(costs(0.06, 0.09), costs(0.04, 0.06, other=0.01))
    assert dtype == "bf16" and "bf16 0.21 s vs fp32 0.3 s" in why and "1.43x faster" in why


def test_a_tie_keeps_bf16_whose_weights_take_half_the_memory():
    assert faster_dtype(costs(0.05, 0.05), costs(0.05, 0.05))[0] == "bf16"


def test_checkpointing_counts_the_forward_twice_in_the_comparison():
    # fp32: cheap backward, dear forward; bf16 the other way round. Equal without checkpointing
    # (0.2 s each); with it fp32 pays its dear forward twice.
    fp32, bf16 = costs(0.07, 0.03), costs(0.03, 0.07)
    assert faster_dtype(fp32, bf16)[0] == "bf16"  # the tie
    assert faster_dtype(fp32, bf16, gradient_checkpointing=True)[0] == "bf16"
    assert faster_dtype(bf16, fp32, gradient_checkpointing=True)[0] == "fp32"


def test_timings_of_different_shapes_are_not_compared():
    with pytest.raises(ValueError, match="different shapes"):
        faster_dtype(costs(0.1, 0.1, rows=4), costs(0.1, 0.1, rows=2))


def test_a_gap_no_dtype_explains_is_taken_for_a_busy_machine():
    assert unbelievable_gap(costs(0.04, 0.06), costs(0.06, 0.09)) is None  # 1.5x: believable
    why = unbelievable_gap(costs(0.004, 0.006), costs(0.3, 0.3))  # 0.02 s against 1.2 s
    assert why is not None and f"differ more than {MAX_BELIEVABLE_GAP:.0f}x" in why and "0.02 s and 1.2 s" in why
    assert unbelievable_gap(costs(0.0, 0.0), costs(0.01, 0.01)) is not None  # a zero is no timing


# ---------------------------------------------------------------- through the preflight


def _preflight(model_dir, machine, ranks_per_node: int = 1, **keys):
    from cpuft.config.job import SFTJobConfig
    from cpuft.planning.preflight import preflight

    return preflight(SFTJobConfig(model=str(model_dir), max_length=128, **keys), machine, ranks_per_node)


def _measurements(cache_root) -> dict[str, StepCosts]:
    """{compute dtype: StepCosts} of what the step-cost cache under `cache_root` holds."""
    entries = [json.loads(p.read_text()) for p in (cache_root / "step-costs").glob("*.json")]
    return {entry["key"]["compute_dtype"]: StepCosts(**entry["costs"]) for entry in entries}


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: the plan keeps fp32 without measuring")
def test_on_this_native_bf16_cpu_auto_measures_both_dtypes_and_plans_the_faster(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    plan = _preflight(tiny_model_dir, probe_machine()).plan
    measured = _measurements(tmp_path)
    if BUSY_MACHINE in plan.reasons["compute_dtype"]:  # timings no dtype explains: neither believed nor kept
        assert plan.compute_dtype == "bf16" and measured == {}
        pytest.skip(f"the machine was too busy to compare the dtypes: {plan.reasons['compute_dtype']}")
    assert set(measured) == {"fp32", "bf16"}
    seconds = {dtype: micro_batch_seconds(c) for dtype, c in measured.items()}
    faster = "fp32" if seconds["fp32"] < seconds["bf16"] else "bf16"
    assert plan.compute_dtype == plan.weights_dtype == faster
    why = plan.reasons["compute_dtype"]
    assert why.startswith(f"auto: measured at {plan.per_device_batch_size} x 128 on this CPU")
    other = "bf16" if faster == "fp32" else "fp32"
    assert f"{faster} {seconds[faster]:.3g} s vs {other} {seconds[other]:.3g} s per micro-batch" in why
    # A second plan reads both figures back from the cache: same choice, nothing measured again.
    stamps = sorted(p.stat().st_mtime_ns for p in (tmp_path / "step-costs").glob("*.json"))
    assert _preflight(tiny_model_dir, probe_machine()).plan.reasons["compute_dtype"] == why
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "step-costs").glob("*.json")) == stamps


@pytest.mark.skipif(not NATIVE_BF16, reason="this CPU has no native bf16: the plan keeps fp32 without measuring")
def test_cpuft_plan_prints_the_measured_dtype_choice(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    proc = run_cpuft("plan", "--model", tiny_model_dir, "--tokens", "10000", "--max-length", "128", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)["plan"]
    if BUSY_MACHINE in plan["reasons"]["compute_dtype"]:
        pytest.skip(f"the machine was too busy to compare the dtypes: {plan['reasons']['compute_dtype']}")
    assert plan["reasons"]["compute_dtype"].startswith(f"auto: measured at {plan['per_device_batch_size']} x 128")
    assert f"; {plan['compute_dtype']}, " in plan["reasons"]["compute_dtype"]


@pytest.mark.skipif(NATIVE_BF16, reason="this CPU has native bf16: the plan measures both dtypes")
def test_on_this_cpu_without_native_bf16_nothing_is_measured(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    plan = _preflight(tiny_model_dir, probe_machine()).plan
    assert plan.compute_dtype == "fp32" and "emulated" in plan.reasons["compute_dtype"]
    assert _measurements(tmp_path) == {}


@pytest.mark.parametrize("machine, keys, dtype, why", [
    (COOPER_LAKE, {"dtype": "bf16"}, "bf16", "requested"),  # a dtype asked for is never second-guessed
    (COOPER_LAKE, {"dtype": "fp32"}, "fp32", "requested"),
    (AVX2_ONLY, {}, "fp32", "emulated"),  # bf16 would be emulated: nothing in doubt
    (COOPER_LAKE, {"quant": "nf4"}, "bf16", "no measured choice: step parts are measured for unquantised weights only"),
    (COOPER_LAKE, {"peft_method": "prefix_tuning"}, "bf16", "no measured choice: step parts are measured for LoRA only"),
])
def test_runs_that_keep_the_fixed_rule_measure_nothing(machine, keys, dtype, why, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    plan = _preflight(tiny_model_dir, machine, **keys).plan
    assert plan.compute_dtype == dtype and why in plan.reasons["compute_dtype"]
    assert _measurements(tmp_path) == {}


def test_ddp_ranks_keep_the_fixed_rule_so_they_agree(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    plan = _preflight(tiny_model_dir, COOPER_LAKE, ranks_per_node=2).plan
    assert plan.compute_dtype == "bf16" and "no measured choice: under DDP every rank" in plan.reasons["compute_dtype"]
    assert _measurements(tmp_path) == {}


def test_a_model_past_the_ceiling_keeps_bf16_unmeasured(tmp_path, monkeypatch):
    """Llama-3.2-1B's shape (config.json only, no weights): bf16 pays there without a doubt."""
    from transformers import LlamaConfig

    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path / "cache"))
    LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path / "model")
    checked = _preflight(tmp_path / "model", COOPER_LAKE)
    assert checked.model_shape.linear_params > MEASURED_DTYPE_MAX_LINEAR_PARAMS
    assert checked.plan.compute_dtype == "bf16"
    assert f"past the {MEASURED_DTYPE_MAX_LINEAR_PARAMS // 10**6}M" in checked.plan.reasons["compute_dtype"]
    assert not (tmp_path / "cache").exists()


def test_a_declared_machine_type_is_planned_by_the_fixed_rule(tiny_model_dir, tmp_path, monkeypatch):
    """`cpuft plan --machine-type`: another machine's CPU, which this one cannot time."""
    monkeypatch.setenv("CPUFT_CACHE_DIR", str(tmp_path))
    proc = run_cpuft("plan", "--model", tiny_model_dir, "--machine-type", "c3-standard-8", "--tokens", "10000", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    plan = json.loads(proc.stdout)["plan"]
    assert plan["compute_dtype"] == "bf16" and plan["reasons"]["compute_dtype"].startswith("auto: CPU has AMX-BF16")
    assert not (tmp_path / "step-costs").exists()
