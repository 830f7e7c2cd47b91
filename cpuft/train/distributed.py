"""More than one process: the rank this process is, its share of the machine, and the launcher.

Owns: reading the world from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE), the threads a rank takes (its share of the physical cores, never all of
them), binding a rank to its NUMA node's cores, "did any rank get a stop signal" (one
all-reduce), and `cpuft sft --nproc-per-node/--nnodes` re-launching itself through
`torch.distributed.run` (torchrun's own code: rendezvous, teardown of every rank when one fails).

DDP itself is the HF Trainer's: under WORLD_SIZE > 1 with `use_cpu` accelerate picks gloo, on
CUDA NCCL; the Trainer's dataloader deals consecutive micro-batches of cpuft's length-grouped
order to the ranks in turn (rank r takes micro-batches r, r+W, ...), so every rank trains rows
of similar length and all ranks together see the one-process order.

Limits: memory is not bound to the NUMA node (no numactl/libnuma: the kernel's first-touch
policy keeps most of a bound rank's pages local); FSDP is not used (not a supported CPU path);
CUDA ranks use device LOCAL_RANK through accelerate.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from cpuft.errors import EXIT_INTERRUPTED, UserError

NUMA_SYSFS = Path("/sys/devices/system/node")


@dataclass(frozen=True)
class World:
    size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_size: int = 1

    @classmethod
    def from_env(cls, env=None) -> "World":
        env = os.environ if env is None else env
        size = int(env.get("WORLD_SIZE", 1))
        return cls(
            size=size,
            rank=int(env.get("RANK", 0)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            local_size=int(env.get("LOCAL_WORLD_SIZE", size)),
        )

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory, logs and draws progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def threads_per_rank(physical_cores: int, local_size: int) -> int:
    """This rank's share of the node's physical cores (ranks on one node split them evenly)."""
    return max(1, physical_cores // max(1, local_size))


def allreduce_bytes(trainable_params: int) -> int:
    """Bytes a rank moves per optimizer step in DDP's ring all-reduce of fp32 gradients (~2x their size)."""
    return trainable_params * 4 * 2


def numa_cpulists(sysfs: Path = NUMA_SYSFS) -> list[list[int]]:
    """The CPUs of each NUMA node, from /sys/devices/system/node/nodeN/cpulist; [] if unknown."""
    nodes = sorted((p for p in sysfs.glob("node[0-9]*") if (p / "cpulist").is_file()), key=lambda p: int(p.name[4:]))
    return [parse_cpulist((p / "cpulist").read_text()) for p in nodes]


def parse_cpulist(text: str) -> list[int]:
    """'0-3,8,10-11' -> [0, 1, 2, 3, 8, 10, 11] (the kernel's cpulist format)."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def bind_to_numa_node(world: World) -> list[int] | None:
    """Pin this rank to NUMA node LOCAL_RANK's CPUs when there is one rank per node; the CPUs or None."""
    nodes = numa_cpulists()
    if len(nodes) < 2 or world.local_size != len(nodes):
        return None
    allowed = os.sched_getaffinity(0)
    cpus = [c for c in nodes[world.local_rank] if c in allowed] or nodes[world.local_rank]
    os.sched_setaffinity(0, cpus)
    return cpus


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (one MAX all-reduce); `flag` when not distributed."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        value = value.cuda()
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def processes_per_node(requested: str, numa_nodes: int) -> int:
    """--nproc-per-node: 'auto' is one process per NUMA node when there is more than one, else 1."""
    if requested == "auto":
        return numa_nodes if numa_nodes > 1 else 1
    try:
        count = int(requested)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"--nproc-per-node must be 'auto' or a positive integer (got {requested!r}).")
    return count


def inside_launcher(env=None) -> bool:
    """True in a process torchrun (or accelerate launch) started: it must not launch again."""
    env = os.environ if env is None else env
    return "TORCHELASTIC_RUN_ID" in env or "LOCAL_RANK" in env


def torchrun_args(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None, module_argv: list[str]) -> list[str]:
    """torchrun's command line for running `python -m cpuft <module_argv>` on every rank."""
    if nnodes > 1 and not rdzv_endpoint:
        raise UserError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (node 0's address, the same on every node).")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank must be in 0..{nnodes - 1} (got {node_rank}).")
    args = [f"--nproc-per-node={nproc_per_node}"]
    if nnodes > 1:
        # The static rendezvous: node 0 hosts the store at the endpoint, node ranks are given.
        args += [f"--nnodes={nnodes}", f"--node-rank={node_rank}", f"--rdzv-endpoint={rdzv_endpoint}",
                 "--rdzv-backend=static", "--max-restarts=0"]
    else:
        args += ["--standalone"]
    return [*args, "--module", "cpuft", *module_argv]


def launch(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None, module_argv: list[str]) -> int:
    """Run the job on every rank through torch.distributed.run; the job's exit status.

    torchrun stops every rank when one exits non-zero. All ranks stopped by a signal with a
    checkpoint (exit 75) is an interruption; any other failure is exit 1 after one line naming
    the first rank that failed (its own message is above, on its stderr)."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(torchrun_args(nproc_per_node, nnodes, node_rank, rdzv_endpoint, module_argv))
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        failures = exc.failures
        codes = {rank: failure.exitcode for rank, failure in failures.items()}
        # A rank still finishing when rank 0 exits 75 gets torchrun's SIGTERM: still a clean stop.
        if EXIT_INTERRUPTED in codes.values() and all(c in (EXIT_INTERRUPTED, -signal.SIGTERM) for c in codes.values()):
            return EXIT_INTERRUPTED
        first = min(failures, key=lambda r: failures[r].timestamp)
        code = codes[first]
        how = f"signal {-code}" if code < 0 else f"exit status {code}"
        print(f"cpuft: rank {first} failed ({how}); torchrun stopped the other ranks. Its error is above.",
              file=sys.stderr, flush=True)
        return 2 if code == 2 else 1
    return 0
