"""Theoretical peak FLOP/s: CPU FLOP per cycle per core by compute path, and GPU datasheet peaks.

The one home of these tables: the planner's `peak_flops` (the MFU denominator) and the declared
cloud machine types (`cpuft.planning.cloud`) both ask here.

CPU: peak = cores x clock x FLOP/cycle/core of the path the dtype runs on. One FMA is 2 FLOP.
- AMX (Sapphire Rapids and later): 1024 bf16 FLOP/cycle/core (Intel's AMX overview: 1,024 BF16
  operations per cycle per core, against 64 FP32 for AVX-512); AMX-FP16 (Granite Rapids) the same.
- AVX-512 on Intel Xeon Gold 6xxx / Platinum: two 512-bit FMA units x 16 fp32 lanes x 2 = 64;
  VDPBF16PS does 2 bf16 products per fp32 lane: 128.
- AVX-512 on AMD Zen 4 (EPYC 9xx4 "Genoa", Ryzen 7000; CPUID family 0x19) is double-pumped:
  512-bit instructions run as two halves on 256-bit datapaths, one 512-bit FMA per cycle, so half
  Intel's rate: 32 fp32, 64 bf16 (A. Yee, "Zen5's AVX512 Teardown", numberworld.org 2024, which
  also describes Zen 4's implementation; Agner Fog, "The microarchitecture of Intel, AMD and VIA
  CPUs", Zen 4 chapter). Zen 5 (family 0x1A, EPYC 9xx5 "Turin") has full 512-bit datapaths:
  Intel's rate.
- AVX2: two 256-bit FMA units x 8 lanes x 2 = 32, on every x86 core cpuft plans for.
Limits: Intel SKUs with one AVX-512 FMA unit (Xeon Silver, some Gold 5xxx) and mobile Zen 5
(double-pumped, also family 0x1A) are overestimated 2x; a bf16 run on a CPU without native bf16
is emulated and gets the fp32 figure.

GPU: NVIDIA datasheet figures, dense (the datasheets' starred figures are with 2:4 sparsity and
are halved here). bf16/fp16 are the tensor-core peaks. fp32 is the FP32 figure of the CUDA cores
(non-tensor), not TF32: PyTorch leaves TF32 off for matmuls by default
(`torch.backends.cuda.matmul.allow_tf32` is False) and cpuft does not turn it on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Dense FLOP per cycle per core, by compute path.
CPU_FLOP_PER_CYCLE = {
    "amx_bf16": 1024,
    "amx_fp16": 1024,
    "avx512_bf16": 128,
    "avx512_fp32": 64,
    "avx2_fp32": 32,
}
# AMD Zen 4 executes each 512-bit instruction on two 256-bit halves: half the per-cycle rate.
DOUBLE_PUMPED_AVX512_PATHS = ("avx512_bf16", "avx512_fp32")
ZEN5_CPU_FAMILY = 0x1A
# What the planner assumes when the clock is unknown (VMs often hide cpufreq).
DEFAULT_CPU_MHZ = 2000.0


@dataclass(frozen=True)
class GpuPeaks:
    """Dense peak FLOP/s per dtype of one GPU model; None where the GPU lacks the dtype."""

    fp32: float
    bf16: float | None
    fp16: float
    source: str

    def for_dtype(self, dtype: str) -> float | None:
        return {"fp32": self.fp32, "bf16": self.bf16, "fp16": self.fp16}.get(dtype)


T = 1e12
# Keys are matched against the name CUDA reports as whole tokens; the key with the most tokens
# wins, so "NVIDIA H100 PCIe" gets "H100 PCIE", not "H100", and "NVIDIA L40S" never gets "L4".
GPU_PEAKS: dict[str, GpuPeaks] = {
    "H200": GpuPeaks(67 * T, 989.5 * T, 989.5 * T, "H200 SXM datasheet: FP32 67, BF16/FP16 1,979 sparse"),
    "H200 NVL": GpuPeaks(60 * T, 835.5 * T, 835.5 * T, "H200 NVL datasheet: FP32 60, BF16/FP16 1,671 sparse"),
    "H100": GpuPeaks(67 * T, 989.5 * T, 989.5 * T, "H100 SXM datasheet: FP32 67, BF16/FP16 1,979 sparse"),
    "H100 PCIE": GpuPeaks(51 * T, 756.5 * T, 756.5 * T, "H100 PCIe datasheet: FP32 51, BF16/FP16 1,513 sparse"),
    "H100 NVL": GpuPeaks(60 * T, 835.5 * T, 835.5 * T, "H100 NVL datasheet: FP32 60, BF16/FP16 1,671 sparse"),
    "A100": GpuPeaks(19.5 * T, 312 * T, 312 * T, "A100 datasheet: FP32 19.5, BF16/FP16 312 (624 sparse)"),
    "L40S": GpuPeaks(91.6 * T, 362.05 * T, 362.05 * T, "L40S datasheet: FP32 91.6, BF16/FP16 362.05 (733 sparse)"),
    "L40": GpuPeaks(90.5 * T, 181.05 * T, 181.05 * T, "L40 datasheet: FP32 90.5, BF16/FP16 181.05 (362.1 sparse)"),
    "L4": GpuPeaks(30.3 * T, 121 * T, 121 * T, "L4 datasheet: FP32 30.3, BF16/FP16 242 sparse"),
    "A10": GpuPeaks(31.2 * T, 125 * T, 125 * T, "A10 datasheet: FP32 31.2, BF16/FP16 125 (250 sparse)"),
    # AWS's variant of the A10; NVIDIA publishes no datasheet. Figures as compared by Baseten
    # ("NVIDIA A10 vs A10G for ML model inference"): more CUDA-core, less tensor throughput.
    "A10G": GpuPeaks(31.52 * T, 70 * T, 70 * T, "A10G (no NVIDIA datasheet; AWS/Baseten): FP32 31.52, BF16/FP16 70"),
    "T4": GpuPeaks(8.1 * T, None, 65 * T, "T4 datasheet: FP32 8.1, FP16 mixed-precision 65; no bf16"),
    "V100": GpuPeaks(15.7 * T, None, 125 * T, "V100 SXM2 datasheet: FP32 15.7, tensor FP16 125; no bf16"),
    "V100 PCIE": GpuPeaks(14 * T, None, 112 * T, "V100 PCIe datasheet: FP32 14, tensor FP16 112; no bf16"),
}


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^A-Z0-9]+", name.upper()) if t]


def gpu_model_key(name: str) -> str | None:
    """The GPU_PEAKS key for a CUDA device name, matching whole tokens; the longest key wins."""
    tokens = _tokens(name)
    best: tuple[int, str] | None = None
    for key in GPU_PEAKS:
        key_tokens = key.split()
        n = len(key_tokens)
        if any(tokens[i:i + n] == key_tokens for i in range(len(tokens) - n + 1)):
            if best is None or n > best[0]:
                best = (n, key)
    return best[1] if best else None


def gpu_peak_flops(name: str, dtype: str) -> tuple[float | None, str]:
    """(dense peak FLOP/s of the GPU called `name` in `dtype`, where the figure comes from)."""
    key = gpu_model_key(name)
    if key is None:
        return None, f"no datasheet figure for {name}"
    peaks = GPU_PEAKS[key]
    peak = peaks.for_dtype(dtype)
    if peak is None:
        return None, f"{key} has no {dtype} ({peaks.source})"
    kind = "CUDA-core FP32, TF32 off" if dtype == "fp32" else f"dense {dtype} tensor core"
    return peak, f"{kind} peak of {key} ({peaks.source})"


def cpu_compute_path(flags, dtype: str) -> str:
    """The CPU_FLOP_PER_CYCLE key `dtype` runs on, given the CPU's feature flags."""
    if dtype == "bf16" and "amx_bf16" in flags:
        return "amx_bf16"
    if dtype == "fp16" and "amx_fp16" in flags:
        return "amx_fp16"
    if dtype == "bf16" and "avx512_bf16" in flags:
        return "avx512_bf16"
    return "avx512_fp32" if "avx512_f" in flags else "avx2_fp32"


def avx512_double_pumped(vendor: str, cpu_family: int | None) -> bool:
    """True for AMD cores before Zen 5 (the only AMD cores with AVX-512 before it are Zen 4)."""
    return vendor == "amd" and (cpu_family is None or cpu_family < ZEN5_CPU_FAMILY)


def cpu_flop_per_cycle(flags, dtype: str, vendor: str = "", cpu_family: int | None = None) -> tuple[int, str]:
    """(dense FLOP per cycle per core, the path's label) for `dtype` on a CPU with `flags`."""
    path = cpu_compute_path(flags, dtype)
    flop = CPU_FLOP_PER_CYCLE[path]
    if path in DOUBLE_PUMPED_AVX512_PATHS and avx512_double_pumped(vendor, cpu_family):
        return flop // 2, f"{path}, AMD Zen 4 double-pumped"
    return flop, path


def cpu_peak_flops(
    cores: int, mhz: float | None, flags, dtype: str, vendor: str = "", cpu_family: int | None = None,
) -> tuple[float, str]:
    """(cores x clock x FLOP/cycle, how it was computed); DEFAULT_CPU_MHZ when the clock is unknown."""
    flop, path = cpu_flop_per_cycle(flags, dtype, vendor, cpu_family)
    mhz = mhz or DEFAULT_CPU_MHZ
    how = f"{cores} cores x {mhz / 1000:.2f} GHz x {flop} FLOP/cycle ({path})"
    return cores * mhz * 1e6 * flop, how
