"""`cpuft merge`: fold an adapter (or a weighted blend of LoRA adapters) into the base model; save a stock model."""

from __future__ import annotations

import argparse

from cpuft.dtypes import DTYPE_NAMES
from cpuft.inference.merge import COMBINATIONS

EPILOG = """\
The output is a plain transformers model directory (safetensors + config + tokenizer): it loads
with AutoModelForCausalLM.from_pretrained(DIR), no cpuft or PEFT needed, and every cpuft
inference command takes it as --model.

Several LoRA adapters: each is scaled by its --weights value and combined with PEFT's
add_weighted_adapter before merging. `cat` (default) is exact: merged = base + sum(w_i * delta_i).
`svd` compresses that sum to the largest rank; linear/ties/dare_*/magnitude_prune are
approximate task-arithmetic methods (ties/dare/magnitude_prune need --density).

examples:
  cpuft merge runs/sft-1 --out models/merged
  cpuft merge runs/style runs/facts --weights 0.6 0.4 --out models/blend
  cpuft merge runs/a/checkpoint-40 --base models/base --out models/a40
"""


def register(subparsers) -> None:
    from cpuft.cli.infer import add_hub_arguments

    parser = subparsers.add_parser(
        "merge",
        help="merge adapter(s) into the base model (stock transformers output)",
        description="Merge a fine-tuned adapter (LoRA, LoHa, LoKr, IA3 or AdaLoRA; or a weighted combination"
        " of several LoRA adapters) into its base model and save the result as a standard Hugging Face"
        " model directory. Prompt tuning, prefix tuning and p-tuning adapters are virtual tokens, not"
        " weight changes: they cannot be merged; generate, chat, eval and serve use them unmerged.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "adapters", nargs="+", metavar="RUN_OR_ADAPTER",
        help="cpuft run directory (its adapter/ is used), adapter directory, or checkpoint-N/",
    )
    parser.add_argument("--out", required=True, help="directory to write; must not exist or be empty")
    parser.add_argument(
        "--weights", nargs="+", type=float, default=None, metavar="W",
        help="one weight per adapter (default 1 each); negative subtracts an adapter",
    )
    parser.add_argument("--combination", default="cat", choices=COMBINATIONS, help="how several adapters are combined (default %(default)s)")
    parser.add_argument("--density", type=float, default=None, help="fraction of values kept by ties/dare/magnitude_prune")
    parser.add_argument("--base", default=None, help="base model to merge into (default: the one recorded in the adapter)")
    add_hub_arguments(parser)
    parser.add_argument(
        "--dtype", default="fp32", choices=DTYPE_NAMES,
        help="dtype of the merged weights (default %(default)s: exact; bf16 halves the size)",
    )
    parser.set_defaults(handler=run)


def run(args) -> int:
    from cpuft.errors import UserError
    from cpuft.inference.merge import merge_adapters, resolve_adapters

    if args.density is not None and not 0.0 < args.density <= 1.0:
        raise UserError(f"--density must be in (0, 1], got {args.density}.")
    adapters = resolve_adapters(args.adapters, args.weights, args.base, args.revision, args.trust_remote_code)
    result = merge_adapters(adapters, args.out, combination=args.combination, density=args.density, dtype=args.dtype)
    how = "merged" if result.combination is None else f"combined ({result.combination}) and merged"
    print(
        f"{how} {len(result.adapters)} adapter(s) into {result.base_model}: {result.parameters / 1e6:.1f}M"
        f" parameters written to {result.out_dir}"
    )
    print(f"load it with: {result.auto_class}.from_pretrained({str(result.out_dir)!r})")
    return 0
