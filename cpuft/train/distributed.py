"""More than one process: the rank this process is, its share of the machine, and the launcher.

Owns: reading the world from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
LOCAL_WORLD_SIZE), checking the --nproc-per-node/--nnodes flags, binding a rank to its NUMA
node's cores, "did any rank get a stop signal" (one all-reduce), `cpuft sft --nproc-per-node/
--nnodes` re-launching itself through `torch.distributed.run` (torchrun's own code: rendezvous,
teardown of every rank when one fails), and turning a failed rank into one message: each rank
records its error in torchrun's error file (`run_rank`), the launcher names the rank that failed
first and the first line of its error (`launch`). The plan decides threads per rank, the global
batch and the all-reduce estimate (cpuft.planning.world).

DDP itself is the HF Trainer's: under WORLD_SIZE > 1 with `use_cpu` accelerate picks gloo, on
CUDA NCCL; the Trainer's dataloader deals consecutive micro-batches of cpuft's length-grouped
order to the ranks in turn (rank r takes micro-batches r, r+W, ...), so every rank trains rows
of similar length and all ranks together see the one-process order.

A rank that fails ends the job: torchrun sees it exit (or die: kill -9, the OOM killer), sends
SIGTERM to the others and SIGKILL after 30 s; ranks blocked in a collective with the dead rank get
gloo's "connection closed" at once. No rank is left hanging, and the run directory keeps its last
complete checkpoint for `--resume`.

Limits: memory is not bound to the NUMA node (no numactl/libnuma: the kernel's first-touch
policy keeps most of a bound rank's pages local); FSDP is not used (not a supported CPU path);
CUDA ranks use device LOCAL_RANK through accelerate. Each launcher reports the ranks of its own
node: with --nnodes > 1, a rank on another node that fails shows here as a lost connection.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from cpuft.errors import (
    EXIT_BAD_INPUT,
    EXIT_INTERRUPTED,
    EXIT_RUN_FAILED,
    UserError,
    first_line,
)

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

    @property
    def nodes(self) -> int:
        """Machines in the job (cpuft launches the same number of ranks on each)."""
        return max(1, self.size // max(1, self.local_size))


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


def world_from_flags(nproc_per_node: str, nnodes: int, numa_nodes: int) -> tuple[int, int]:
    """(ranks per node, nodes) for --nproc-per-node auto|N and --nnodes M; UserError on bad values."""
    if nnodes < 1:
        raise UserError(f"--nnodes must be a positive integer (got {nnodes}).")
    return processes_per_node(nproc_per_node, numa_nodes), nnodes


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


def run_rank(job, *args) -> int:
    """`job(*args)` on a rank torchrun started, its error recorded in torchrun's error file instead
    of printed, so the launcher reports one failure for the job rather than a traceback per rank
    (the traceback goes to a file next to it). Outside torchrun: `job(*args)` as it is."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not (inside_launcher() and error_file):
        return job(*args)
    try:
        return job(*args)
    except UserError as exc:
        _record_failure(error_file, exc, bad_input=True)
        return EXIT_BAD_INPUT
    except Exception as exc:
        _record_failure(error_file, exc, bad_input=False)
        return EXIT_RUN_FAILED


def _record_failure(error_file: str, exc: BaseException, bad_input: bool) -> None:
    """torchrun's error-file format (torch.distributed.elastic's ErrorHandler) plus cpuft's own
    entry: the exact time (torchrun's is whole seconds: too coarse to tell which rank failed
    first), the message as the user should read it, and where the traceback is."""
    now = time.time()
    line = first_line(exc)
    message = str(exc) if bad_input else (line if line == type(exc).__name__ else f"{type(exc).__name__}: {line}")
    stack = traceback.format_exc()
    traceback_file = Path(error_file).with_name("traceback.txt")
    Path(error_file).parent.mkdir(parents=True, exist_ok=True)
    traceback_file.write_text(stack)
    data = {
        "message": {"message": f"{type(exc).__name__}: {exc}",
                    "extraInfo": {"py_callstack": stack, "timestamp": str(int(now))}},
        "cpuft": {"time": now, "message": message, "bad_input": bad_input, "traceback": str(traceback_file)},
    }
    Path(error_file).write_text(json.dumps(data))


class _AboveError(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.ERROR


# torchrun's own log lines about a failure ("Sending process ... SIGTERM", "failed (exitcode: 1)
# local_rank: 1 ...", its OMP_NUM_THREADS notice): `launch` says the same in one message.
_TORCHRUN_LOGGERS = ("torch.distributed.run", "torch.distributed.elastic.multiprocessing.api",
                     "torch.distributed.elastic.agent.server.api")


def launch(nproc_per_node: int, nnodes: int, node_rank: int, rdzv_endpoint: str | None, module_argv: list[str]) -> int:
    """Run the job on every rank through torch.distributed.run; the job's exit status.

    torchrun stops every rank when one exits non-zero. All ranks stopped by a signal with a
    checkpoint (exit 75) is an interruption; any other failure is one message naming the rank
    that failed first and why, then exit 2 (bad input) or 1."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = torchrun.parse_args(torchrun_args(nproc_per_node, nnodes, node_rank, rdzv_endpoint, module_argv))
    quiet = _AboveError()
    for name in _TORCHRUN_LOGGERS:
        logging.getLogger(name).addFilter(quiet)
    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        # A rank still finishing when rank 0 exits 75 gets torchrun's SIGTERM: still a clean stop.
        if EXIT_INTERRUPTED in codes.values() and all(c in (EXIT_INTERRUPTED, -signal.SIGTERM) for c in codes.values()):
            return EXIT_INTERRUPTED
        message, code = failure_message(exc.failures, nproc_per_node * nnodes)
        print(message, file=sys.stderr, flush=True)
        return code
    finally:
        for name in _TORCHRUN_LOGGERS:
            logging.getLogger(name).removeFilter(quiet)
    return 0


def failure_message(failures: dict, world_size: int) -> tuple[str, int]:
    """(one paragraph, exit status) for torchrun's failed ranks ({rank: ProcessFailure}).

    The rank that failed first is the cause; the others mostly failed because it did (a lost
    connection in the next collective, or torchrun's SIGTERM). A rank killed by a signal other
    than torchrun's SIGTERM left no error file and is the cause; else the earliest recorded error."""
    def recorded(failure) -> dict:
        data = failure.error_file_data
        return data.get("cpuft", {}) if isinstance(data, dict) else {}

    torn_down = (-signal.SIGTERM, -signal.SIGINT, EXIT_INTERRUPTED)
    # A rank whose peer vanished mid-collective can abort on its own (gloo's C++ "terminate called
    # without an active exception": SIGABRT) before torchrun sees the peer die: a rank killed by
    # any other signal is the cause, whatever its number.
    killed = [rank for _, _, rank in sorted(
        (f.exitcode == -signal.SIGABRT, f.timestamp, rank)
        for rank, f in failures.items() if f.exitcode < 0 and f.exitcode not in torn_down
    )]
    with_errors = sorted((recorded(f)["time"], rank) for rank, f in failures.items() if "time" in recorded(f))
    resume = (" The run directory keeps its last complete checkpoint, if one was saved:"
              " `cpuft sft --output-dir DIR --resume` continues from it.")
    if killed:
        rank = killed[0]
        sig = -failures[rank].exitcode
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        hint = " (kill -9, or the kernel's out-of-memory killer: see `dmesg`)" if sig == signal.SIGKILL else ""
        return (f"cpuft: rank {rank} of {world_size} was killed by {name}{hint}; torchrun stopped the other ranks."
                + resume, EXIT_RUN_FAILED)
    if with_errors:
        rank = with_errors[0][1]
        entry = recorded(failures[rank])
        if entry.get("bad_input"):
            return f"cpuft: error: {entry['message']} (rank {rank} of {world_size})", EXIT_BAD_INPUT
        return (f"cpuft: rank {rank} of {world_size} failed: {entry['message']}; torchrun stopped the other ranks."
                f" Its traceback: {entry['traceback']}." + resume, EXIT_RUN_FAILED)
    rank = min(failures, key=lambda r: failures[r].timestamp)
    code = failures[rank].exitcode
    how = f"signal {-code}" if code < 0 else f"exit status {code}"
    return (f"cpuft: rank {rank} of {world_size} failed ({how}); torchrun stopped the other ranks." + resume,
            EXIT_BAD_INPUT if code == EXIT_BAD_INPUT else EXIT_RUN_FAILED)
