"""QLoRA: the CUDA plan on synthetic GPU machines, bitsandbytes config objects, and NF4 end to end on CPU.

The CUDA run itself is owed (no GPU here): scripts/bench_qlora.py runs it where one exists.
"""

from __future__ import annotations

import json

import pytest
import torch

from cpuft.hardware.probe import Machine
from cpuft.modeling import bitsandbytes_config
from cpuft.planning.memory import default_optimizer
from cpuft.planning.plan import PlanRequest, plan_for
from tests.conftest import run_cpuft, write_jsonl
from tests.test_peft_methods import conversation_rows

GIB = 2**30
HOST = dict(cpu_name="Intel Xeon", cpu_flags=["avx512_f", "avx2", "fma3"], physical_cores=6, logical_cores=12,
            usable_cpus=12, ram_bytes=85 * GIB)
L4 = dict(name="NVIDIA L4", total_memory_bytes=22 * GIB, bf16_supported=True, compute_capability="8.9")
A100_80 = dict(name="NVIDIA A100-SXM4-80GB", total_memory_bytes=80 * GIB, bf16_supported=True, compute_capability="8.0")
T4 = dict(name="Tesla T4", total_memory_bytes=15 * GIB, bf16_supported=False, compute_capability="7.5")
LLAMA_13B_PARAMS = 13_015_864_320


def gpu_machine(gpu: dict) -> Machine:
    return Machine.from_dict({**HOST, "cuda_devices": [gpu]})


def test_auto_picks_nf4_when_bf16_weights_do_not_fit_the_gpu():
    plan = plan_for(gpu_machine(L4), PlanRequest(model_params=LLAMA_13B_PARAMS))
    assert (plan.device, plan.compute_dtype, plan.quantization) == ("cuda", "bf16", "nf4")
    assert "NF4" in plan.reasons["quantization"] and "L4" in plan.reasons["quantization"]
    assert plan.gradient_checkpointing is True
    assert default_optimizer(plan.device, plan.quantization) == "paged_adamw_8bit"


def test_auto_keeps_bf16_lora_when_the_model_fits():
    plan = plan_for(gpu_machine(A100_80), PlanRequest(model_params=LLAMA_13B_PARAMS))
    assert plan.quantization == "none"
    assert default_optimizer(plan.device, plan.quantization) == "adamw_torch"


@pytest.mark.parametrize("quant", ["nf4", "int8", "none"])
def test_quant_request_is_honoured_on_cuda(quant):
    plan = plan_for(gpu_machine(A100_80), PlanRequest(quant=quant, model_params=1_000_000))
    assert plan.quantization == quant


def test_nf4_config_for_a_cuda_plan_is_the_qlora_recipe():
    plan = plan_for(gpu_machine(L4), PlanRequest(quant="nf4"))
    config = bitsandbytes_config(plan.quantization, plan.compute_dtype)
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant is True
    assert config.bnb_4bit_compute_dtype == torch.bfloat16


def test_pre_ampere_gpu_computes_nf4_in_fp16():
    plan = plan_for(gpu_machine(T4), PlanRequest(quant="nf4"))
    assert bitsandbytes_config(plan.quantization, plan.compute_dtype).bnb_4bit_compute_dtype == torch.float16


def test_int8_config_is_llm_int8():
    plan = plan_for(gpu_machine(A100_80), PlanRequest(quant="int8"))
    config = bitsandbytes_config(plan.quantization, plan.compute_dtype)
    assert config.load_in_8bit and not config.load_in_4bit


@pytest.fixture(scope="module")
def qlora_model(tmp_path_factory):
    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    root = tmp_path_factory.mktemp("qlora")
    rows = conversation_rows(24, seed=1)
    texts = [" ".join(m["content"] for m in row["messages"]) for row in rows] * 4
    # bitsandbytes quantises in blocks of 64: hidden sizes must be multiples of it.
    model = build_tiny_model(root / "tiny", texts=texts, spec=TinyModelSpec(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128))
    return model, write_jsonl(root / "data.jsonl", rows)


def test_nf4_loads_4bit_layers_and_trains_an_fp32_adapter_on_cpu(qlora_model, tmp_path):
    import bitsandbytes as bnb

    from cpuft.config.job import resolve_config
    from cpuft.hardware.probe import probe_machine
    from cpuft.train.sft import prepare_run, train_run

    model_dir, data = qlora_model
    config = resolve_config(None, dict(
        model=str(model_dir), dataset=str(data), output_dir=str(tmp_path / "run"), quant="nf4", device="cpu",
        dtype="fp32", max_steps=3, per_device_batch_size=4, gradient_accumulation_steps=1, max_length=64, eval_fraction=0.0,
        learning_rate=5e-2, warmup_steps=0, lora_r=4, save_steps=100,
    ))
    run = prepare_run(config, probe_machine(), log=lambda *a: None)
    four_bit = [m for m in run.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 2 * 7  # every projection of both layers; lm_head stays unquantised
    assert run.preflight.memory_plan.settings.quantization == "nf4"
    result = train_run(run, show_progress=False, log=lambda *a: None)
    assert result.status == "completed" and result.summary.quantization == "nf4"
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    # TRL casts a quantised model's adapter to bf16; cpuft keeps it fp32 where compute is fp32.
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    # LoRA's B matrices start at zero: after three steps they must have moved.
    lora_b = [p for name, p in result.model.named_parameters() if "lora_B" in name]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    assert result.summary.final_loss == result.summary.final_loss  # not NaN


@pytest.mark.slow
def test_cpuft_sft_quant_nf4_end_to_end(qlora_model, tmp_path):
    model_dir, data = qlora_model
    run_dir = tmp_path / "run"
    result = run_cpuft("sft", "--model", model_dir, "--dataset", data, "--quant", "nf4", "--device", "cpu",
                       "--max-steps", "2", "--per-device-batch-size", "4", "--gradient-accumulation-steps", "1",
                       "--max-length", "64", "--eval-fraction", "0", "--output-dir", run_dir, "--no-progress")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "Memory plan: QLoRA NF4 + lora" in result.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["quantization"] == "nf4" and summary["steps"] == 2
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    assert plan["quantization"] == "nf4" and plan["reasons"]["quantization"].startswith("requested")
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
