"""`cpuft plan`: memory, time and cost of a fine-tuning run, from the model's config alone.

Takes every `cpuft sft` flag (and --config), so the plan it prints is the one `cpuft sft` would
check before loading weights; adds --method (full/lora/qlora), --tokens, --utilization and --json,
and plans the DDP world `cpuft sft --nproc-per-node N [--nnodes M]` would run (the same flags).
"""

from __future__ import annotations

import argparse
import json
import os

from cpuft.cli.world_arguments import add_world_arguments
from cpuft.config.cli_args import (
    PASS_THROUGH_EPILOG,
    add_config_arguments,
    config_values,
)
from cpuft.config.job import read_config_file, resolve_config
from cpuft.errors import UserError

EPILOG = """\
What it counts: weights (by dtype or NF4/int8), gradients and optimizer states of what trains,
activations kept for backward (less with --gradient-checkpointing), logits, and the runtime.
No weights are loaded: the model is built from config.json on PyTorch's meta device.

Time: tokens per epoch (from --dataset through the chat template, truncated to --max-length, or
--tokens N) x FLOPs per token / (FLOP/s x utilisation). FLOP/s is a matmul measured here, or the
declared peak of --machine-type; cost uses that type's hourly on-demand and spot prices.

More than one process (--nproc-per-node N, --nnodes M, as for `cpuft sft`): threads and batch are
per rank, memory per rank and per node (every rank holds a full model copy), the time is one
rank's share of the tokens, and the gradient all-reduce per optimizer step is estimated.

Exit status: 0 (also when the run would not fit: read 'fits' in --json); 2 bad input.

examples:
  cpuft plan --model models/tiny --dataset sample
  cpuft plan --model ./llama-7b --method qlora --machine-type c3-standard-44 --tokens 2000000
  cpuft plan --model ./llama-7b --method full --per-device-batch-size 1 --json
  cpuft plan --model ./llama-7b --machine-type c3-standard-44 --nproc-per-node 2 --nnodes 2
  cpuft plan --list-machine-types

""" + PASS_THROUGH_EPILOG


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan",
        help="memory, time and cost of a run, before loading any weights",
        description="Estimate the memory (weights, gradients, optimizer, activations), the time per"
        " epoch and the cost of a fine-tuning run from the model's config alone.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", metavar="FILE", help="YAML file of `cpuft sft` config keys")
    parser.add_argument(
        "--method", choices=["lora", "qlora", "full"], default="lora",
        help="full fine-tuning, a PEFT adapter (--peft-method, default lora) on unquantised weights,"
        " or QLoRA (NF4 base weights; --quant int8 for LLM.int8) (default: lora)",
    )
    parser.add_argument("--tokens", type=int, metavar="N", help="training tokens per epoch (instead of counting --dataset)")
    parser.add_argument(
        "--utilization", type=float, metavar="X",
        help="share of the FLOP/s figure training reaches (default: 0.5 of a measured matmul, 0.25 of a"
        " declared CPU peak, 0.35 of a GPU peak)",
    )
    parser.add_argument("--json", action="store_true", help="print machine, plan, memory and time as JSON")
    parser.add_argument("--list-machine-types", action="store_true", help="list the declared GCP machine types and exit")
    add_world_arguments(parser, launch=False)
    add_config_arguments(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from cpuft.planning.cloud import MACHINE_TYPES

    if args.list_machine_types:
        print(_machine_types_table(MACHINE_TYPES))
        return 0
    if args.utilization is not None and not 0 < args.utilization <= 1:
        raise UserError(f"--utilization must be in (0, 1], got {args.utilization}.")
    if args.tokens is not None and args.tokens < 1:
        raise UserError(f"--tokens must be at least 1, got {args.tokens}.")
    cli_values = config_values(args)
    config = resolve_config(args.config, cli_values)
    dataset_given = "dataset" in cli_values or (args.config and "dataset" in read_config_file(args.config))
    report = build_report(config, args.method, args.tokens, args.utilization, dataset_given,
                          args.nproc_per_node, args.nnodes)
    if args.json:
        print(json.dumps(report["json"], indent=2, default=str))
    else:
        print(report["text"])
    return 0


def build_report(
    config, method: str, tokens: int | None, utilization: float | None, dataset_given: bool,
    nproc_per_node: str = "1", nnodes: int = 1,
) -> dict:
    """Plan, memory and time for `config` (a resolved SFTJobConfig) run by `nproc_per_node`
    ('auto' or N) x `nnodes` processes, through the preflight `cpuft sft` runs
    (cpuft.planning.preflight); {'text': ..., 'json': ...}."""
    from dataclasses import replace

    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.cloud import declared_machine_type
    from cpuft.planning.preflight import estimate_time, preflight
    from cpuft.train.distributed import world_from_flags

    machine_type = declared_machine_type(config)
    machine = machine_type.as_machine() if machine_type else probe_machine()
    ranks_per_node, nodes = world_from_flags(nproc_per_node, nnodes, machine.numa_nodes)
    if method == "qlora" and config.quant in ("auto", "none"):
        config = replace(config, quant="nf4")
    if method == "full":
        if config.quant not in ("auto", "none"):
            raise UserError("--method full trains every weight and cannot use a quantised base (--quant); use --method qlora.")
        config = replace(config, quant="none")
    checked = preflight(config, machine, ranks_per_node, nodes, training="full" if method == "full" else "adapter",
                        where=machine_type.name if machine_type else None)
    if checked.model_shape is None:
        raise UserError(
            f"cannot size '{config.model}' from its config; cpuft plan supports architectures transformers"
            " can build from config.json."
        )
    plan, memory = checked.plan, checked.memory_plan

    time_estimate, time_note = None, None
    token_count, mean_seq_len = tokens, float(config.max_length)
    if token_count is None and not dataset_given and not _hub_reachable():
        # The default dataset lives on the Hub, whose client retries for ~20 s before giving up
        # when the network is down: a plan is asked for to be quick.
        time_note = (f"time not estimated: the default dataset {config.dataset} is on the Hugging Face Hub,"
                     " which cannot be reached from here; pass --dataset FILE or --tokens N")
    elif token_count is None:
        try:
            token_count, mean_seq_len = _count_dataset_tokens(config)
        except UserError as exc:
            if dataset_given:
                raise
            time_note = f"time not estimated: the default dataset is unavailable ({exc}); pass --dataset or --tokens N"
    step_seconds = None
    if token_count is not None:
        time_estimate = estimate_time(checked, token_count, mean_seq_len, utilization)
        step_seconds = time_estimate.seconds_per_epoch / max(1.0, token_count / mean_seq_len / plan.global_batch_size)

    where = machine_type.name if machine_type else "this machine"
    text = [f"cpuft plan for {config.model} on {where}", "", checked.describe()]
    text.append("")
    text.append(time_estimate.format() if time_estimate else time_note)
    if plan.allreduce is not None:
        text.append(plan.allreduce.line(step_seconds))
    # The time estimate prices one machine; every node bills for the run's hours.
    all_nodes = None
    if time_estimate and plan.nodes > 1 and time_estimate.cost_on_demand is not None:
        all_nodes = {"nodes": plan.nodes, "on_demand": time_estimate.cost_on_demand * plan.nodes,
                     "spot": time_estimate.cost_spot * plan.nodes if time_estimate.cost_spot is not None else None}
        spot = f", spot ${all_nodes['spot']:,.2f}" if all_nodes["spot"] is not None else ""
        text.append(f"cost of all {plan.nodes} machines: on-demand ${all_nodes['on_demand']:,.2f}{spot}")
    return {
        "text": "\n".join(text),
        "json": {
            "model": config.model,
            "machine_type": config.machine_type,
            "machine": machine.to_dict(),
            "plan": plan.to_dict(),
            "memory": memory.to_dict(),
            "time": time_estimate.to_dict() if time_estimate else None,
            "time_note": time_note,
            "cost_usd_all_nodes": all_nodes,
        },
    }


def _hub_reachable() -> bool:
    """Whether the Hugging Face Hub answers a TCP connection. In offline mode (HF_HUB_OFFLINE /
    HF_DATASETS_OFFLINE) the libraries read their cache at once and fail fast, so the answer is
    True: let them try the cache."""
    from cpuft.train.trainer_args import reachable

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("HF_DATASETS_OFFLINE", "0") not in ("", "0"):
        return True
    return reachable(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


def _count_dataset_tokens(config) -> tuple[int, float]:
    from transformers import AutoTokenizer

    from cpuft.data.chat_template import install_default_chat_template
    from cpuft.data.prepare import prepare_dataset
    from cpuft.modeling import pretrained_kwargs
    from cpuft.data.training_set import tokens_per_epoch

    data = prepare_dataset(
        config.dataset, row_format=config.dataset_format, split=config.dataset_split,
        eval_fraction=config.eval_fraction, max_samples=config.max_samples, seed=config.seed,
        revision=config.dataset_revision,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            config.model, **pretrained_kwargs(config.model, config.revision, config.trust_remote_code)
        )
    except Exception as exc:
        raise UserError(f"cannot load the tokenizer of '{config.model}' to count tokens: {exc}; pass --tokens N.") from None
    install_default_chat_template(tokenizer)  # what `cpuft sft` gives a base model (no-op with a template)
    return tokens_per_epoch(data.train, tokenizer, config.max_length)


def _machine_types_table(types) -> str:
    lines = [f"{'machine type':<16} {'vCPU':>5} {'RAM GB':>7} {'GPU':<22} {'peak TFLOP/s':<24} {'$/h':>6} {'spot $/h':>8}"]
    for m in types.values():
        gpu = f"{m.gpu.name.replace('NVIDIA ', '')} {m.gpu.total_memory_bytes / 2**30:.0f} GiB" if m.gpu else "-"
        peaks = ", ".join(f"{k} {v / 1e12:.1f}" for k, v in m.peak_flops.items())
        star = "~" if m.prices_approximate else " "
        lines.append(
            f"{m.name:<16} {m.vcpus:>5} {m.ram_bytes / 1e9:>7.0f} {gpu:<22} {peaks:<24}"
            f" {star}{m.on_demand_usd_per_hour:>5.2f} {star}{m.spot_usd_per_hour:>7.2f}"
        )
    lines.append("~ approximate us-central1 price; c3-standard-22/44 from early-2025 price data. Prices change.")
    return "\n".join(lines)
