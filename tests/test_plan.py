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
    # H100 SXM datasheet: BF16 Tensor Core 1,979 TFLOPS with sparsity, half of it dense.
    assert "H100" in plan.reasons["peak_flops"] and plan.peak_flops == pytest.approx(1979e12 / 2, rel=1e-3)


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
    assert any("cpuft sft --nproc-per-node auto" in w for w in plan.warnings)
    per_node = plan_for(two_socket, PlanRequest(ranks_per_node=2))
    assert per_node.warnings == () and per_node.reasons["world"].startswith("one rank per NUMA node (2)")


def test_the_plan_knows_the_world_of_two_ranks_on_each_of_two_nodes():
    # c3-standard-22: 11 physical cores per node; 2 ranks per node take 5 each (not 11, not 22).
    plan = plan_for(SAPPHIRE_RAPIDS, PlanRequest(ranks_per_node=2, nodes=2))
    assert (plan.world_size, plan.threads) == (4, 5)
    assert "11 physical cores shared by the 2 ranks" in plan.reasons["threads"] and "1 core(s) left idle" in plan.reasons["threads"]
    # cpuft's CPU default 4 x 4 per rank; DDP averages 4 ranks' gradients: 64 samples per optimizer step.
    assert (plan.effective_batch_size, plan.global_batch_size) == (16, 64)
    rows = {name: value for name, value, _ in plan.rows()}
    assert rows["world"] == "4 ranks = 2 per node x 2 nodes" and rows["threads"] == "5 per rank"
    assert rows["batch"] == "4 x 4 accumulation = 16 per rank, 64 global"
    data = json.loads(json.dumps(plan.to_dict()))
    assert (data["world_size"], data["global_batch_size"], data["ranks_per_node"], data["nodes"]) == (4, 64, 2, 2)
    assert "gloo" in plan.reasons["world"] and "full model copy" in plan.reasons["world"]
    # A rank's peak is its 5 cores': 5 x 3.0 GHz x 1,024 AMX bf16 FLOP/cycle.
    assert plan.peak_flops == pytest.approx(5 * 3.0e9 * 1024)


def test_one_process_is_a_world_of_one():
    plan = plan_for(AVX2_ONLY, AUTO)
    assert (plan.world_size, plan.global_batch_size, plan.allreduce) == (1, 16, None)
    assert dict((n, v) for n, v, _ in plan.rows())["world"] == "1 process"


def test_requested_threads_times_ranks_over_the_cores_warns_and_bad_worlds_are_refused():
    plan = plan_for(SAPPHIRE_RAPIDS, PlanRequest(threads=8, ranks_per_node=2))
    assert plan.threads == 8 and any("8 threads x 2 ranks on 11 physical cores" in w for w in plan.warnings)
    with pytest.raises(PlanError, match="at least 1"):
        plan_for(SAPPHIRE_RAPIDS, PlanRequest(ranks_per_node=0))


def test_the_model_architecture_comes_in_the_request():
    from cpuft.planning.architecture import ArchitectureFacts, Decision

    facts = ArchitectureFacts(
        model_type="bloom", model_class="BloomForCausalLM", task_type="CAUSAL_LM",
        attention=Decision("eager", "BLOOM's ALiBi attention has no SDPA path"),
        target_modules=Decision("all-linear", "every linear layer but the head"), linear_names=("dense",),
    )
    plan = plan_for(AVX2_ONLY, PlanRequest(architecture=facts))
    assert (plan.attn_implementation, plan.model_class, plan.task_type) == ("eager", "BloomForCausalLM", "CAUSAL_LM")
    assert plan.reasons["attn_implementation"] == "BLOOM's ALiBi attention has no SDPA path"


def test_packing_is_refused_with_an_attention_that_could_cross_samples():
    with pytest.raises(PlanError, match="cross sample"):
        plan_for(AVX2_ONLY, PlanRequest(packing=True, attn_implementation="flex_attention_unknown"))
    assert plan_for(AVX2_ONLY, PlanRequest(packing=True)).packing is True


def test_explicit_batch_and_checkpointing_are_honoured():
    plan = plan_for(AVX2_ONLY, PlanRequest(per_device_batch_size=2, gradient_accumulation_steps=8, gradient_checkpointing=True))
    assert (plan.per_device_batch_size, plan.gradient_accumulation_steps, plan.effective_batch_size) == (2, 8, 16)
    assert plan.gradient_checkpointing is True
    assert any("1.5x slower" in w for w in plan.warnings)


def test_cpu_peaks_are_cores_times_clock_times_published_flop_per_cycle():
    # c3-standard-22: 11 cores x 3.0 GHz x 1024 bf16 FLOP/cycle (AMX) = 33.8 TFLOP/s, the
    # "c3-standard-22 ~ 34 TFLOPS bf16 peak" of Intel's figures.
    assert plan_for(SAPPHIRE_RAPIDS, AUTO).peak_flops == pytest.approx(33.792e12)
    # 2 cores x 2.445 GHz x 32 fp32 FLOP/cycle (two 256-bit FMA units x 8 lanes x 2).
    assert plan_for(AVX2_ONLY, AUTO).peak_flops == pytest.approx(156.48e9)
    # Ice Lake, fp32: 16 cores x 2.9 GHz x 64 (two 512-bit FMA units x 16 lanes x 2).
    assert plan_for(ICE_LAKE, AUTO).peak_flops == pytest.approx(2.9696e12)


GENOA = Machine.from_dict(dict(  # AMD EPYC 9B14 (GCP C3D, Zen 4): AVX-512 and AVX-512-BF16 on 256-bit datapaths
    cpu_name="AMD EPYC 9B14", cpu_flags=["avx512_bf16", "avx512_f", "avx512_vnni", "avx2", "fma3"],
    physical_cores=4, logical_cores=8, usable_cpus=8, ram_bytes=32 * GIB, cpu_max_mhz=3000.0,
    cpu_vendor_id="AuthenticAMD", cpu_family=25,  # /proc/cpuinfo: family 0x19
))


def test_zen4_avx512_is_double_pumped_half_of_intels_rate():
    intel = Machine.from_dict({**GENOA.to_dict(), "cpu_name": "Intel(R) Xeon(R) Platinum 8380H",
                               "cpu_vendor_id": "GenuineIntel", "cpu_family": 6})
    # bf16 (VDPBF16PS): Intel 4 x 3.0 GHz x 128 = 1.536 TFLOP/s; Zen 4 half of it.
    assert plan_for(intel, AUTO).peak_flops == pytest.approx(1.536e12)
    zen4 = plan_for(GENOA, AUTO)
    assert zen4.compute_dtype == "bf16" and zen4.peak_flops == pytest.approx(0.768e12)
    assert "Zen 4" in zen4.reasons["peak_flops"]
    # fp32 AVX-512: 4 x 3.0 GHz x 32 on Zen 4 (one 512-bit FMA per cycle), 64 on Intel.
    assert plan_for(GENOA, PlanRequest(dtype="fp32")).peak_flops == pytest.approx(0.384e12)
    assert plan_for(intel, PlanRequest(dtype="fp32")).peak_flops == pytest.approx(0.768e12)


def test_zen5_has_full_width_avx512_and_a_machine_file_without_family_counts_as_zen4():
    turin = Machine.from_dict({**GENOA.to_dict(), "cpu_name": "AMD EPYC 9B45", "cpu_family": 26})
    assert plan_for(turin, AUTO).peak_flops == pytest.approx(1.536e12)
    described = {k: v for k, v in GENOA.to_dict().items() if k not in ("cpu_vendor_id", "cpu_family")}
    assert plan_for(Machine.from_dict(described), AUTO).peak_flops == pytest.approx(0.768e12)


# Dense datasheet figures (the datasheets' sparse figures halved where only those are printed).
@pytest.mark.parametrize(
    "gpu_name, dtype, tflops",
    [
        ("NVIDIA L40S", "bf16", 362.05),  # L40S datasheet: BF16 362.05 | 733 sparse
        ("NVIDIA L40", "bf16", 181.05),  # L40 datasheet: BF16 181.05 | 362.1 sparse; not the L4
        ("NVIDIA L4", "bf16", 121.0),  # L4 datasheet: BF16 242 with sparsity
        ("NVIDIA A10G", "bf16", 70.0),  # AWS's A10 variant: less tensor throughput than the A10
        ("NVIDIA A10", "bf16", 125.0),  # A10 datasheet: BF16 125 | 250 sparse
        ("NVIDIA A100-SXM4-80GB", "bf16", 312.0),
        ("NVIDIA A100 80GB PCIe", "bf16", 312.0),
        ("NVIDIA H100 PCIe", "bf16", 756.5),  # H100 PCIe datasheet: 1,513 sparse; not the SXM's 989
        ("NVIDIA H200 NVL", "bf16", 835.5),
        ("Tesla T4", "fp16", 65.0),
    ],
)
def test_gpu_peak_is_the_most_specific_datasheet_entry(gpu_name, dtype, tflops):
    gpu = CudaDevice(name=gpu_name, total_memory_bytes=24 * GIB, bf16_supported=dtype == "bf16")
    plan = plan_for(with_gpu(AVX2_ONLY, gpu), PlanRequest(dtype=dtype))
    assert plan.peak_flops == pytest.approx(tflops * 1e12)


@pytest.mark.parametrize("gpu_name, tflops", [("NVIDIA H100 80GB HBM3", 67.0), ("NVIDIA A100-SXM4-40GB", 19.5),
                                              ("NVIDIA L4", 30.3)])
def test_fp32_on_a_gpu_gets_the_cuda_core_fp32_peak_not_the_tensor_core_one(gpu_name, tflops):
    # PyTorch keeps TF32 off for fp32 matmuls by default, so fp32 runs on the CUDA cores.
    gpu = CudaDevice(name=gpu_name, total_memory_bytes=40 * GIB, bf16_supported=True)
    plan = plan_for(with_gpu(AVX2_ONLY, gpu), PlanRequest(dtype="fp32"))
    assert plan.peak_flops == pytest.approx(tflops * 1e12)
    assert "FP32" in plan.reasons["peak_flops"]


def test_unknown_gpu_has_no_peak_rather_than_a_neighbours():
    # A substring match would give this 8 GB workstation card the A100's 312 TFLOP/s.
    gpu = CudaDevice(name="NVIDIA RTX A1000 6GB Laptop GPU", total_memory_bytes=6 * GIB, bf16_supported=True)
    plan = plan_for(with_gpu(AVX2_ONLY, gpu), AUTO)
    assert plan.peak_flops is None and "no datasheet figure" in plan.reasons["peak_flops"]


def test_plan_is_pure_and_serialisable():
    first, second = plan_for(SAPPHIRE_RAPIDS, AUTO), plan_for(SAPPHIRE_RAPIDS, AUTO)
    assert first == second
    data = json.loads(json.dumps(first.to_dict()))
    assert data["device"] == "cpu" and data["dtype"] == "bf16" and data["effective_batch_size"] == 16
    assert all(why for _, _, why in first.rows())


def test_machine_round_trips_through_json():
    machine = with_gpu(SAPPHIRE_RAPIDS, H100)
    assert Machine.from_dict(json.loads(json.dumps(machine.to_dict()))) == machine


def test_plan_fuses_lora_on_cpu_only_and_says_why():
    plan = plan_for(AVX2_ONLY, PlanRequest(device="cpu"))
    assert plan.fused_lora and "tests/test_fused_lora.py" in plan.reasons["fused_lora"]
    assert ("fused_lora", "on", plan.reasons["fused_lora"]) in plan.rows()
    compiled = plan_for(AVX2_ONLY, PlanRequest(device="cpu", torch_compile=True))
    assert not compiled.fused_lora and "torch.compile" in compiled.reasons["fused_lora"]
    gpu = plan_for(with_gpu(AVX2_ONLY, H100), PlanRequest(device="cuda"))
    assert not gpu.fused_lora

