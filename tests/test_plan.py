"""The planner against synthetic machines: what a user on each kind of box would get, and why."""

from __future__ import annotations

import json

import pytest

from cpuft.errors import PlanError
from cpuft.hardware.probe import CudaDevice, Machine
from cpuft.planning.plan import PlanRequest, plan_for

GIB = 2**30

SAPPHIRE_RAPIDS = Machine(  # GCP c3-standard-22: 11 physical cores, 22 vCPUs
    cpu_name="Intel(R) Xeon(R) Platinum 8481C",
    cpu_flags=frozenset({"amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_f", "avx512_vnni", "avx2", "fma3"}),
    physical_cores=11, logical_cores=22, usable_cpus=22, ram_bytes=88 * GIB, cpu_max_mhz=3000.0,
    torch_cpu_isa="AVX512",
)
ICE_LAKE = Machine(  # AVX-512 but no bf16 instructions
    cpu_name="Intel(R) Xeon(R) Platinum 8375C",
    cpu_flags=frozenset({"avx512_f", "avx512_vnni", "avx2", "fma3"}),
    physical_cores=16, logical_cores=32, usable_cpus=32, ram_bytes=128 * GIB, cpu_max_mhz=2900.0,
    torch_cpu_isa="AVX512",
)
COOPER_LAKE = Machine(  # AVX-512-BF16 without AMX
    cpu_name="Intel(R) Xeon(R) Platinum 8380H",
    cpu_flags=frozenset({"avx512_bf16", "avx512_f", "avx2", "fma3"}),
    physical_cores=28, logical_cores=56, usable_cpus=56, ram_bytes=192 * GIB,
)
AVX2_ONLY = Machine(
    cpu_name="AMD EPYC", cpu_flags=frozenset({"avx2", "fma3"}),
    physical_cores=2, logical_cores=2, usable_cpus=2, ram_bytes=24 * GIB, cpu_max_mhz=2445.0,
    torch_cpu_isa="AVX2",
)
H100 = CudaDevice(name="NVIDIA H100 80GB HBM3", total_memory_bytes=80 * GIB, bf16_supported=True, compute_capability="9.0")
T4 = CudaDevice(name="Tesla T4", total_memory_bytes=15 * GIB, bf16_supported=False, compute_capability="7.5")
L4 = CudaDevice(name="NVIDIA L4", total_memory_bytes=22 * GIB, bf16_supported=True, compute_capability="8.9")


def with_gpu(machine: Machine, gpu: CudaDevice) -> Machine:
    return Machine.from_dict({**machine.to_dict(), "cuda_devices": [gpu.__dict__]})


AUTO = PlanRequest()


def test_amx_cpu_plans_bf16_autocast_with_bf16_weights():
    plan = plan_for(SAPPHIRE_RAPIDS, AUTO)
    assert (plan.device, plan.compute_dtype, plan.weights_dtype) == ("cpu", "bf16", "bf16")
    assert "AMX" in plan.reasons["compute_dtype"]
    assert plan.quantization == "none"
    assert plan.gradient_checkpointing is False
    assert plan.warnings == ()


def test_avx512_without_bf16_plans_fp32():
    plan = plan_for(ICE_LAKE, AUTO)
    assert plan.compute_dtype == "fp32"
    assert "emulated" in plan.reasons["compute_dtype"]


def test_avx512_bf16_without_amx_plans_bf16():
    plan = plan_for(COOPER_LAKE, AUTO)
    assert plan.compute_dtype == "bf16"
    assert "AVX-512-BF16" in plan.reasons["compute_dtype"]


def test_avx2_only_plans_fp32_and_explains_emulation():
    plan = plan_for(AVX2_ONLY, AUTO)
    assert (plan.device, plan.compute_dtype, plan.weights_dtype) == ("cpu", "fp32", "fp32")
    assert "emulated" in plan.reasons["compute_dtype"] and "3x" in plan.reasons["compute_dtype"]


def test_bf16_requested_on_avx2_runs_with_a_warning():
    plan = plan_for(AVX2_ONLY, PlanRequest(dtype="bf16"))
    assert plan.compute_dtype == "bf16"
    assert len(plan.warnings) == 1 and "emulates bf16" in plan.warnings[0]


def test_fp16_on_a_cpu_without_amx_fp16_is_refused():
    with pytest.raises(PlanError, match="AMX-FP16"):
        plan_for(SAPPHIRE_RAPIDS, PlanRequest(dtype="fp16"))


def test_cuda_requested_without_a_gpu_is_refused():
    with pytest.raises(PlanError, match="no CUDA GPU"):
        plan_for(AVX2_ONLY, PlanRequest(device="cuda"))


@pytest.mark.parametrize("field,value", [("dtype", "fp8"), ("device", "tpu"), ("quant", "gptq")])
def test_unknown_values_are_refused(field, value):
    with pytest.raises(PlanError, match="unknown"):
        plan_for(SAPPHIRE_RAPIDS, PlanRequest(**{field: value}))


def test_cuda_box_plans_bf16_lora_when_weights_fit():
    machine = with_gpu(SAPPHIRE_RAPIDS, H100)
    plan = plan_for(machine, PlanRequest(model_params=7_000_000_000))  # 14 GB of bf16 weights
    assert (plan.device, plan.compute_dtype, plan.quantization) == ("cuda", "bf16", "none")
    assert "H100" in plan.reasons["peak_flops"] and plan.peak_flops == pytest.approx(989e12)


def test_cuda_box_switches_to_nf4_when_bf16_weights_do_not_fit():
    machine = with_gpu(AVX2_ONLY, L4)
    plan = plan_for(machine, PlanRequest(model_params=13_000_000_000))  # 26 GB of bf16 on a 22 GB card
    assert plan.quantization == "nf4"
    assert "NF4" in plan.reasons["quantization"]
    assert plan.gradient_checkpointing is True


def test_cuda_nf4_when_asked_even_if_it_fits():
    plan = plan_for(with_gpu(AVX2_ONLY, H100), PlanRequest(quant="nf4", model_params=1_000_000_000))
    assert plan.quantization == "nf4" and plan.reasons["quantization"] == "requested"


def test_pre_ampere_gpu_plans_fp16_and_refuses_bf16():
    machine = with_gpu(AVX2_ONLY, T4)
    assert plan_for(machine, AUTO).compute_dtype == "fp16"
    with pytest.raises(PlanError, match="no bf16"):
        plan_for(machine, PlanRequest(dtype="bf16"))


def test_cpu_device_forced_on_a_gpu_box():
    plan = plan_for(with_gpu(SAPPHIRE_RAPIDS, H100), PlanRequest(device="cpu"))
    assert plan.device == "cpu" and plan.compute_dtype == "bf16"


def test_threads_are_physical_cores_capped_by_affinity():
    assert plan_for(SAPPHIRE_RAPIDS, AUTO).threads == 11  # not the 22 hyperthreads
    container = Machine.from_dict({**SAPPHIRE_RAPIDS.to_dict(), "usable_cpus": 4})
    assert plan_for(container, AUTO).threads == 4


def test_more_threads_than_cores_warns():
    plan = plan_for(AVX2_ONLY, PlanRequest(threads=4))
    assert plan.threads == 4 and any("hyperthreads" in w for w in plan.warnings)


def test_two_socket_machine_suggests_one_process_per_numa_node():
    two_socket = Machine.from_dict({**SAPPHIRE_RAPIDS.to_dict(), "numa_nodes": 2, "sockets": 2})
    plan = plan_for(two_socket, AUTO)
    assert any("accelerate launch --num_processes 2" in w for w in plan.warnings)


def test_packing_is_refused_with_an_attention_that_could_cross_samples():
    with pytest.raises(PlanError, match="cross sample"):
        plan_for(AVX2_ONLY, PlanRequest(packing=True, attn_implementation="flex_attention_unknown"))
    assert plan_for(AVX2_ONLY, PlanRequest(packing=True)).packing is True


def test_explicit_batch_and_checkpointing_are_honoured():
    plan = plan_for(AVX2_ONLY, PlanRequest(per_device_batch_size=2, gradient_accumulation_steps=8, gradient_checkpointing=True))
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.effective_batch_size) == (2, 8, 16)
    assert plan.gradient_checkpointing is True
    assert any("1.5x slower" in w for w in plan.warnings)


def test_amx_peak_is_far_above_avx2_peak_per_core():
    amx = plan_for(SAPPHIRE_RAPIDS, AUTO)
    avx2 = plan_for(AVX2_ONLY, AUTO)
    per_core_ratio = (amx.peak_flops / amx.threads / 3000) / (avx2.peak_flops / avx2.threads / 2445)
    assert per_core_ratio == pytest.approx(1024 / 32)


def test_plan_is_pure_and_serialisable():
    first, second = plan_for(SAPPHIRE_RAPIDS, AUTO), plan_for(SAPPHIRE_RAPIDS, AUTO)
    assert first == second
    data = json.loads(json.dumps(first.to_dict()))
    assert data["device"] == "cpu" and data["dtype"] == "bf16" and data["effective_batch_size"] == 16
    assert all(why for _, _, why in first.rows())


def test_machine_round_trips_through_json():
    machine = with_gpu(SAPPHIRE_RAPIDS, H100)
    assert Machine.from_dict(json.loads(json.dumps(machine.to_dict()))) == machine
