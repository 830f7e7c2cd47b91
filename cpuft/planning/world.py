"""The world a run trains in: DDP ranks per node x nodes, each rank's share of the cores, the
global batch, and what the gradient all-reduce costs per optimizer step.

Pure arithmetic (no torch, no I/O). `cpuft.planning.plan.plan_for` uses it to plan threads per
rank and the global batch; `cpuft.planning.fit.plan_job` adds the all-reduce estimate once the
memory plan knows how many gradient bytes the ranks exchange.

The all-reduce model (DDP's ring all-reduce of the trainable gradients, in buckets of at most
DDP_BUCKET_BYTES): every rank sends and receives 2 x (N-1)/N x the gradient bytes per optimizer
step, in 2 x (N-1) hops per bucket, so
    seconds = buckets x 2 (N-1) x HOP_LATENCY + 2 (N-1)/N x bytes / bandwidth.
Assumed figures (estimates, not measurements of the user's machine):
- gloo on CPU, one node: GLOO_BYTES_PER_SECOND. gloo sends through TCP even between ranks of one
  machine (loopback), so it is far below memory bandwidth: 0.3-0.46 GB/s and 0.75 ms per hop
  measured on a loaded 2-core AVX2 VM (2 ranks, 4-16 MiB, torch 2.13); more with idle cores.
- gloo across nodes: the slower of that and the NIC (NIC_BYTES_PER_SECOND, 10 Gbit/s; GCP's
  C3 VMs allow 23-100 Gbit/s egress, but one gloo TCP stream seldom fills it).
- NCCL on CUDA: NCCL_BYTES_PER_SECOND (PCIe 4.0 x16 in practice; NVLink is faster).
Limits: the optimizer step's other costs and the overlap of the all-reduce with the backward
pass (DDP starts a bucket as soon as its gradients are ready) are not modelled: the estimate is
an upper bound on the time the all-reduce adds.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

GLOO_BYTES_PER_SECOND = 0.5e9
NIC_BYTES_PER_SECOND = 1.25e9
NCCL_BYTES_PER_SECOND = 10e9
HOP_LATENCY_SECONDS = 0.5e-3
DDP_BUCKET_BYTES = 25 * 2**20  # torch DDP's bucket_cap_mb default


def threads_per_rank(physical_cores: int, ranks_per_node: int) -> int:
    """A rank's share of its node's physical cores: ranks on one node split them evenly."""
    return max(1, physical_cores // max(1, ranks_per_node))


@dataclass(frozen=True)
class AllReduceEstimate:
    """DDP's gradient all-reduce for one optimizer step, per rank."""

    gradient_bytes: int  # what DDP reduces: the trainable parameters' gradients
    sent_bytes: int  # what each rank sends (and receives): 2 (N-1)/N x gradient_bytes
    seconds: float
    assumption: str  # the bandwidth and latency the seconds rest on

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        return f"{self.gradient_bytes / 2**20:,.2f} MiB, ~{self.seconds * 1e3:,.1f} ms"

    def line(self, step_seconds: float | None = None) -> str:
        """'all-reduce per step: X MiB, ~Y ms, Z % of the step' (no share without a step time)."""
        share = f", {self.seconds / step_seconds:.1%} of the step" if step_seconds else ""
        return f"all-reduce per step: {self.summary()}{share}"


def allreduce_estimate(gradient_bytes: int, world_size: int, nodes: int, device: str) -> AllReduceEstimate | None:
    """The all-reduce per optimizer step of `gradient_bytes` over `world_size` ranks; None in one process."""
    if world_size < 2:
        return None
    if device == "cuda":
        bandwidth, link = NCCL_BYTES_PER_SECOND, "NCCL"
    elif nodes > 1:
        bandwidth, link = min(GLOO_BYTES_PER_SECOND, NIC_BYTES_PER_SECOND), "gloo over TCP across nodes"
    else:
        bandwidth, link = GLOO_BYTES_PER_SECOND, "gloo over TCP loopback"
    sent = 2 * (world_size - 1) / world_size * gradient_bytes
    buckets = max(1, math.ceil(gradient_bytes / DDP_BUCKET_BYTES))
    seconds = buckets * 2 * (world_size - 1) * HOP_LATENCY_SECONDS + sent / bandwidth
    assumption = (
        f"ring all-reduce over {world_size} ranks: 2 x {world_size - 1}/{world_size} x the gradients per rank,"
        f" {link} at an assumed {bandwidth / 1e9:g} GB/s and {HOP_LATENCY_SECONDS * 1e3:g} ms per hop"
        f" ({buckets} bucket{'s' if buckets > 1 else ''}); an upper bound: DDP overlaps it with the backward pass"
    )
    return AllReduceEstimate(int(gradient_bytes), int(sent), seconds, assumption)
