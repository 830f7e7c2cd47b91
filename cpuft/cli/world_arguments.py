"""The command-line flags of a DDP world (--nproc-per-node, --nnodes, ...), shared by the commands
that train (`cpuft sft`) and those that plan a training run (`cpuft plan`), so both read the same
world the same way (checked by cpuft.train.distributed.world_from_flags)."""

from __future__ import annotations


def add_world_arguments(parser, launch: bool = True) -> None:
    """--nproc-per-node and --nnodes, for `cpuft sft` and `cpuft plan` alike (checked by
    cpuft.train.distributed.world_from_flags); with `launch`, torchrun's --node-rank and
    --rdzv-endpoint too."""
    group = parser.add_argument_group("more than one process (DDP through torchrun, gloo on CPU)")
    group.add_argument(
        "--nproc-per-node", default="1", metavar="auto|N",
        help="processes on this machine: auto = one per NUMA node when there is more than one (default 1)",
    )
    group.add_argument("--nnodes", type=int, default=1, help="machines in the job (default 1)")
    if launch:
        group.add_argument("--node-rank", type=int, default=0, help="this machine's rank, 0..nnodes-1")
        group.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="node 0's address for the rendezvous (nnodes > 1)")
