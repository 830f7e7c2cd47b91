"""`cpuft sft`: LoRA/QLoRA supervised fine-tuning with a hardware plan."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cpuft.cli.world_arguments import add_world_arguments
from cpuft.config.cli_args import (
    PASS_THROUGH_EPILOG,
    add_config_arguments,
    config_values,
)
from cpuft.config.job import is_job_key, resolve_config
from cpuft.config.yaml_file import read_mapping
from cpuft.errors import EXIT_INTERRUPTED, UserError
from cpuft.run_dir import RunDir

EPILOG = """\
Every option is also a YAML key (use underscores): values come from defaults < --config FILE <
flags; a true/false key takes --x, --x true|false or --no-x. The plan (device, dtype, threads,
batch, ...) is printed before training with a reason for each choice; `cpuft env` shows it
without training.

""" + PASS_THROUGH_EPILOG + """

Run directory: adapter/ (stock PEFT loads it), config.yaml, plan.json, metrics.jsonl,
tensorboard/, loss_curve.png, summary.json, checkpoint-N/.

Exit status: 0 done; 1 failed; 2 bad input; 75 stopped by SIGTERM/SIGINT after saving a
checkpoint (run again with --resume --output-dir DIR).

examples:
  cpuft sft --model models/tiny --dataset sample --max-steps 60
  cpuft sft --model Qwen/Qwen2.5-0.5B-Instruct --dataset ./lima/train.jsonl --device auto
  cpuft sft --config job.yaml --lora-r 32 --max-grad-norm 0.5 --use-dora true
  cpuft sft --output-dir runs/job1 --resume
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft",
        help="fine-tune a LoRA adapter (supervised)",
        description="Supervised fine-tuning of a LoRA adapter with TRL's SFTTrainer, planned for this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(parser, "sft")


def add_job_arguments(parser, kind: str) -> None:
    """The flags of a training command (`cpuft sft`, `cpuft dpo`): the job's keys, the run flags,
    the world; the handler trains a job of `kind`."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of config keys")
    parser.add_argument(
        "--resume", action="store_true",
        help="continue the run in --output-dir from its last checkpoint (its saved config is the base)",
    )
    parser.add_argument("--dry-run", action="store_true", help="validate config, data and model, print the plan, do not train")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs and batch jobs)")
    add_world_arguments(parser)
    add_config_arguments(parser, kind)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from cpuft.train.distributed import run_rank

    launched = _launch_ranks(args)
    if launched is not None:
        return launched
    return run_rank(_train, args)  # on a torchrun rank, its error goes to the launcher


def _train(args) -> int:
    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.cloud import declared_machine_type
    from cpuft.train.sft import prepare_run, train_run

    kind = args.job_kind
    cli_values = config_values(args)
    base, origins = None, None
    if args.resume:
        if "output_dir" not in cli_values:
            raise UserError("--resume needs --output-dir: the run directory to continue.")
        run_dir = Path(cli_values["output_dir"])
        sync_to = cli_values.get("sync_to") or (read_mapping(args.config)[0].get("sync_to") if args.config else None)
        if sync_to and not RunDir(run_dir).config_file.is_file():
            args.resume = _restore_from_store(str(sync_to), run_dir)
        if args.resume:
            base, origins = _saved_config(run_dir, kind)
    config = resolve_config(args.config, cli_values, base=base, origins=origins, kind=kind)
    declared_machine_type(config)  # an unknown machine_type stops the job before anything is written

    if kind == "dpo":
        from cpuft.train.dpo import prepare_dpo_run as prepare_run
    run = prepare_run(config, probe_machine(), resume=args.resume)
    if run.world.is_main:
        print(f"\n{run.data.describe()}")
        print(f"run directory: {run.run_dir}\n", flush=True)
    if args.dry_run:
        print("dry run: nothing trained, nothing written.")
        return 0

    result = train_run(run, show_progress=not args.no_progress)
    summary = result.summary
    if summary is None:  # a rank other than 0: rank 0 reports for the job
        return EXIT_INTERRUPTED if result.status == "interrupted" else 0
    print()
    if result.status == "finished":
        print(f"{result.run_dir} is already finished ({summary.steps} steps): nothing trained, nothing written."
              f" adapter: {summary.adapter_dir}")
        return 0
    if result.status == "interrupted":
        print(
            f"interrupted at step {summary.steps}: checkpoint saved in {result.run_dir}."
            f" Continue with: cpuft {kind} --output-dir {result.run_dir} --resume"
            + (f" --sync-to {config.sync_to}" if config.sync_to else "")
        )
        return EXIT_INTERRUPTED
    loss_line = f"loss {summary.first_loss:.4f} -> {summary.final_loss:.4f}" if summary.final_loss is not None else "no loss logged"
    eval_line = f", eval loss {summary.eval_loss:.4f}" if summary.eval_loss is not None else ""
    mfu = f", MFU {summary.mfu:.1%}" if summary.mfu is not None else ""
    if summary.steps_this_run == 0:  # resumed from a checkpoint that held every step
        speed = "all trained before this resume"
    else:
        speed = (f"in {summary.train_seconds:.1f} s, {summary.train_tokens_per_second:.0f} tokens/s{mfu},"
                 f" peak RSS {summary.peak_rss_mib:.0f} MiB")
    print(f"done: {summary.steps} steps {speed}, {loss_line}{eval_line}")
    preference = summary.preference
    if preference is not None and preference.eval_reward_accuracy is not None:
        print(f"held-out pairs: reward accuracy {preference.eval_reward_accuracy:.1%},"
              f" margin {preference.eval_reward_margin:.4f} (beta {preference.beta:g})")
    evaluation = summary.evaluation
    if evaluation is not None and evaluation.stopped_early:
        print(f"early stopping: no lower eval loss in {config.early_stopping_patience} evaluation(s) in a row")
    if evaluation is not None and evaluation.adapter_is_best_checkpoint:
        loss = f" (eval loss {evaluation.best_eval_loss:.4f})" if evaluation.best_eval_loss is not None else ""
        print(f"best checkpoint: {evaluation.best_checkpoint}{loss}; {RunDir.ADAPTER}/ holds its weights")
    print(f"adapter: {summary.adapter_dir}  (summary: {RunDir(result.run_dir).summary_file})")
    sys.stdout.flush()
    return 0


def _restore_from_store(url: str, run_dir: Path) -> bool:
    """--resume --sync-to on a machine without the run: True when restored from the store (then
    resume), False when the store holds no run either (then start fresh, as a new VM's first
    attempt does)."""
    from cpuft.storage import open_writable_store

    store = open_writable_store(url)
    if not store.has(RunDir.CONFIG) or not any(c.complete for c in store.checkpoints()):
        # A run killed before its first checkpoint was stored has nothing to continue from.
        print(f"--resume: neither {run_dir} nor {url} holds a checkpoint; starting fresh.", flush=True)
        return False
    report = store.restore(run_dir)
    if report.checkpoint is None:  # the complete ones failed their sha256 check on download
        raise UserError(f"--resume: no checkpoint in {url} could be restored (see the warnings above).")
    print(f"restored {report.checkpoint} from {url} into {run_dir}", flush=True)
    return True


def _saved_config(run_dir: Path, kind: str) -> tuple[dict, dict]:
    """The saved job (cpuft's keys and the pass-through values) and where each key is in the file.

    Keys this version no longer knows are dropped: a run started by an older cpuft resumes."""
    path = RunDir(run_dir).config_file
    if not path.is_file():
        raise UserError(f"--resume: {run_dir} is not a cpuft run directory (no {RunDir.CONFIG}).")
    saved, origins = read_mapping(path)
    known = {str(k): v for k, v in saved.items() if is_job_key(str(k), kind)}
    return known, {k: origins[k] for k in known}


_LAUNCH_FLAGS = ("--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint")


def _launch_ranks(args) -> int | None:
    """With more than one process asked for, re-run this same command on every rank through
    torchrun (cpuft.train.distributed) and return its exit status; None to run here."""
    from cpuft.train import distributed

    if distributed.inside_launcher():
        return None
    numa_nodes = len(distributed.numa_cpulists()) if args.nproc_per_node == "auto" else 1
    nproc, nnodes = distributed.world_from_flags(args.nproc_per_node, args.nnodes, numa_nodes)
    if nproc == 1 and nnodes == 1:
        return None
    return distributed.launch(nproc, args.nnodes, args.node_rank, args.rdzv_endpoint, _without_launch_flags(sys.argv[1:]))


def _without_launch_flags(argv: list[str]) -> list[str]:
    """The command line the ranks run: this one less the flags that asked for the launch."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in _LAUNCH_FLAGS:
            skip = True
        elif not token.startswith(tuple(f + "=" for f in _LAUNCH_FLAGS)):
            kept.append(token)
    return kept
