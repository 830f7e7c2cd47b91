"""`cpuft` command line: parse, validate, hand off. No training logic lives here.

Exit status: 0 done, 1 the run failed, 2 bad input (message, no traceback), 75 interrupted by a
signal after saving a checkpoint (continue with --resume).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from cpuft import __version__
from cpuft.errors import EXIT_BAD_INPUT, EXIT_RUN_FAILED, RunFailed, UserError
from cpuft.modeling import defer_bitsandbytes

# Subcommand modules under cpuft.cli, in --help order.
COMMAND_MODULES = ["sft", "dpo", "env", "tiny_model", "bench", "plan", "merge", "infer", "serve", "batch"]

DESCRIPTION = """\
CPU-first LoRA/QLoRA fine-tuning. `cpuft sft --device auto` probes the machine, plans
(AMX/AVX512-BF16 -> bf16, AVX2 -> fp32, CUDA -> bf16 [+ NF4]) and trains a LoRA adapter
with TRL's SFTTrainer.

examples:
  cpuft env                                  what this machine is and what cpuft would do
  cpuft tiny-model --out models/tiny         build a small offline model to try things with
  cpuft sft --model models/tiny --dataset sample --max-steps 60
  cpuft sft --output-dir runs/x --resume     continue an interrupted run
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cpuft", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"cpuft {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"cpuft.cli.{name}").register(subparsers)
    return parser


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.ERROR


def _not_untied_head_notice(record: logging.LogRecord) -> bool:
    return "so we will NOT tie them" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    # Quiet third-party chatter that a user cannot act on; warnings that matter come from the plan.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # transformers 5 renamed gradient -> activation checkpointing; TRL/PEFT still call the old
    # names internally. Nothing a user can act on.
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*", category=FutureWarning)
    # With torchao installed (the `int8` extra) transformers and PEFT import it, and its import logs
    # every CUDA-only kernel it cannot load on a CPU build, plus a torch pytree deprecation.
    # bitsandbytes stays out until a quantised path is planned (cpuft.modeling); where one is,
    # its notices about an optional Hub kernel are silenced there.
    defer_bitsandbytes()
    for noisy_logger in ("torchao", "torch.utils._pytree"):
        logging.getLogger(noisy_logger).setLevel(logging.ERROR)
        # `import torch` resets torch.* loggers' levels to NOTSET; a filter survives that reset.
        logging.getLogger(noisy_logger).addFilter(_below_error)
    # T5 v1.1 / Flan-T5 / mT5 checkpoints hold their own output head; transformers 5 says on
    # every load that it will "NOT tie" it, which is what those checkpoints need.
    logging.getLogger("transformers.modeling_utils").addFilter(_not_untied_head_notice)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    try:
        return int(args.handler(args) or 0)
    except UserError as exc:
        print(f"cpuft: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except (RunFailed, OSError) as exc:
        print(f"cpuft: the run failed: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except KeyboardInterrupt:
        print("cpuft: aborted.", file=sys.stderr)
        return 130
    except Exception:
        import traceback

        traceback.print_exc()
        print("cpuft: the run failed (the traceback above is from the library that raised).", file=sys.stderr)
        return EXIT_RUN_FAILED


if __name__ == "__main__":
    raise SystemExit(main())
