"""`cpuft dpo`: preference tuning (DPO) of a LoRA adapter, planned for this machine.

The same flags, YAML keys, run directory and behaviour as `cpuft sft` wherever they mean the same
(cpuft.cli.sft's handler runs both); TRL's DPOConfig fields (--beta, --loss-type, ...) pass through.
"""

from __future__ import annotations

import argparse

from cpuft.cli.sft import add_job_arguments
from cpuft.config.cli_args import PASS_THROUGH_EPILOG

EPILOG = """\
Data: preference pairs in TRL's formats, from a .jsonl/.json/.parquet file, a Hub dataset, or
`sample` (the bundled preference companion of the sft sample): {"prompt", "chosen", "rejected"}
(explicit prompt) or {"chosen", "rejected"} (implicit), as strings or as chat messages. Rows are
checked before anything is written: a missing chosen/rejected, wrong roles, a chosen equal to its
rejected or non-text input is refused naming the file, line and field.

Starting point: --model takes a base model or a cpuft SFT run directory. From a run, its adapter
is merged into its base in memory: the policy starts from the SFT model and the reference is that
same model (the adapter disabled: no second copy of the weights). The reference log-probs are
precomputed when the run passes over its rows more than once (the plan says why).

Every option is also a YAML key (use underscores): defaults < --config FILE < flags.
learning_rate defaults to 5e-05 here (a LoRA adapter's DPO rate; sft's is 2e-4).

""" + PASS_THROUGH_EPILOG.replace("SFTConfig", "DPOConfig") + """

Run directory: as cpuft sft's (adapter/, config.yaml, plan.json, metrics.jsonl with TRL's
rewards/accuracies and margins, loss_curve.png, summary.json with held-out reward accuracy and
margin, checkpoint-N/). cpuft generate/chat/eval/serve/merge take it like an SFT run.

Exit status: 0 done; 1 failed; 2 bad input; 75 stopped by SIGTERM/SIGINT after saving a
checkpoint (run again with --resume --output-dir DIR).

examples:
  cpuft dpo --model models/tiny --dataset sample --max-steps 20
  cpuft dpo --model runs/sft-job1 --dataset ./prefs.jsonl --beta 0.2 --output-dir runs/dpo-job1
  cpuft dpo --output-dir runs/dpo-job1 --resume
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "dpo",
        help="align a LoRA adapter with preference pairs (DPO)",
        description="Direct preference optimisation of a LoRA adapter with TRL's DPOTrainer, planned for this machine.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_job_arguments(parser, "dpo")
