"""This machine's measured matmul throughput: the honest denominator for MFU on a CPU.

Datasheet peaks (cores x clock x FLOP/cycle) assume the all-core turbo clock and perfect
vector-unit use; a shared or thermally limited CPU never gets there. `measure_gemm_flops` times
a matmul of the shape the model's MLP runs (tokens x hidden @ hidden x intermediate) and reports
the median of repeats, so MFU against it says how much of what this CPU can actually do the
training loop gets.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class GemmMeasurement:
    dtype: str
    m: int
    k: int
    n: int
    threads: int
    repeats: int
    median_seconds: float
    flops_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def measure_gemm_flops(m: int, k: int, n: int, dtype: str = "fp32", threads: int | None = None,
                       repeats: int = 30, warmup: int = 5) -> GemmMeasurement:
    """Median FLOP/s of `(m x k) @ (k x n)` in `dtype` ("fp32", "bf16" or "fp16") on this CPU.

    `threads` applies to the measurement only; the caller's thread count is restored after.
    """
    import torch

    from cpuft.dtypes import torch_dtype

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=generator).to(torch_dtype(dtype))
        b = torch.randn(k, n, generator=generator).to(torch_dtype(dtype))
        out = torch.empty(m, n, dtype=torch_dtype(dtype))
        for _ in range(warmup):
            torch.matmul(a, b, out=out)
        seconds = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.matmul(a, b, out=out)
            seconds.append(time.perf_counter() - start)
        median = statistics.median(seconds)
        return GemmMeasurement(
            dtype=dtype, m=m, k=k, n=n, threads=torch.get_num_threads(), repeats=repeats,
            median_seconds=median, flops_per_second=2.0 * m * k * n / median,
        )
    finally:
        torch.set_num_threads(previous_threads)
