"""`cpuft tiny-model`: build a small random-weight Llama and tokenizer offline (demo, tests)."""

from __future__ import annotations

from pathlib import Path

from cpuft.errors import UserError
from cpuft.testing.tiny_model import TinyModelSpec


def register(subparsers) -> None:
    spec = TinyModelSpec()
    parser = subparsers.add_parser(
        "tiny-model",
        help="build a small random Llama + tokenizer offline",
        description="Train a byte-level BPE tokenizer (with a chat template) on the bundled sample and"
        " save it with a randomly initialised Llama-style model, as a plain Hugging Face model"
        " directory. For trying cpuft and for tests where no hub is reachable.",
    )
    parser.add_argument("--out", required=True, help="directory to write (replaced atomically if it exists)")
    parser.add_argument("--hidden-size", type=int, default=spec.hidden_size, help="model width (default %(default)s)")
    parser.add_argument("--layers", type=int, default=spec.num_layers, help="decoder layers (default %(default)s)")
    parser.add_argument("--heads", type=int, default=spec.num_heads, help="attention heads (default %(default)s)")
    parser.add_argument("--kv-heads", type=int, default=spec.num_kv_heads, help="key/value heads (default %(default)s)")
    parser.add_argument("--intermediate-size", type=int, default=spec.intermediate_size, help="MLP width (default %(default)s)")
    parser.add_argument("--vocab-size", type=int, default=spec.vocab_size, help="BPE vocabulary (default %(default)s)")
    parser.add_argument("--seed", type=int, default=spec.seed, help="init seed (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace an existing directory")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from cpuft.testing.tiny_model import build_tiny_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        if (out / "config.json").is_file():
            print(f"{out} already holds a model; keeping it (pass --force to rebuild).")
            return 0
        raise UserError(f"{out} exists and is not a model directory; choose another --out.")
    if args.hidden_size % args.heads or args.heads % args.kv_heads:
        raise UserError("--hidden-size must be divisible by --heads, and --heads by --kv-heads.")
    spec = TinyModelSpec(
        vocab_size=args.vocab_size, hidden_size=args.hidden_size, num_layers=args.layers,
        num_heads=args.heads, num_kv_heads=args.kv_heads, intermediate_size=args.intermediate_size,
        seed=args.seed,
    )
    path = build_tiny_model(out, spec=spec)
    print(f"wrote tiny model and tokenizer to {path}")
    return 0
