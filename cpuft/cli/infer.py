"""`cpuft generate`, `cpuft chat`, `cpuft eval`: use a fine-tune (base + adapter, or merged).

The three share one way to name and load the model (`--model` + precision flags); each parses
its own arguments and hands off to cpuft.inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

from cpuft.config.choices import DeviceRequest, DtypeRequest, values
from cpuft.errors import UserError
from cpuft.run_dir import RunDir

MODEL_HELP = """\
--model takes: a cpuft run directory (uses its adapter/), an adapter directory (adapter/ or
checkpoint-N/), a merged model directory (`cpuft merge`), or any causal LM directory / Hub id.
Any adapter `cpuft sft` trains loads: LoRA, LoHa, LoKr, IA3, AdaLoRA, prompt tuning, prefix
tuning, p-tuning. An adapter's base model is the one recorded in its adapter_config.json unless
--base is given.

Precision: --dtype auto picks fp32 on AVX2-only CPUs and bf16 on AMX / AVX-512-BF16 CPUs and
GPUs. --int8 quantises the linear layers for CPU inference (the adapter is merged first; prompt,
prefix and p-tuning adapters cannot be, so only the base is int8) with the method measured
fastest for this CPU kind (docs/int8.md), or --int8-method's; a method whose int8 layers take
fp32 activations only (torch-dynamic) runs in fp32 where the plan picks bf16, and says so. --nf4
loads the base in 4 bits with bitsandbytes (the CUDA path; runs on x86 CPUs too, slowly; not
with LoHa or LoKr adapters).
"""


def add_model_arguments(parser: argparse.ArgumentParser, model_positional: bool = False, merge_option: bool = True) -> None:
    """The flags that name and load a model, shared by generate, chat, eval and `cpuft serve`.

    `model_positional`: MODEL is a positional argument (serve) instead of --model; either way it
    lands in `args.model`. `merge_option=False` leaves out --merge (serve always merges).
    """
    from cpuft.inference.int8 import INT8_METHODS

    model_help = "run dir, adapter dir, merged model dir or Hub id"
    if model_positional:
        parser.add_argument("model", metavar="MODEL", help=model_help)
    group = parser.add_argument_group("model")
    if not model_positional:
        group.add_argument("--model", required=True, help=model_help)
    group.add_argument("--base", default=None, help="base model for an adapter (default: recorded in the adapter)")
    add_hub_arguments(group)
    group.add_argument("--device", default="auto", choices=values(DeviceRequest), help="where to run (default %(default)s)")
    group.add_argument("--dtype", default="auto", choices=values(DtypeRequest), help="weights/compute dtype (default %(default)s)")
    group.add_argument("--int8", action="store_true", help="int8 linear layers on CPU, with the method measured best for this CPU")
    group.add_argument(
        "--int8-method", default=None, choices=list(INT8_METHODS), metavar="METHOD",
        help=f"use this int8 method instead (implies --int8): {', '.join(INT8_METHODS)}",
    )
    group.add_argument("--nf4", action="store_true", help="4-bit NF4 base weights (bitsandbytes), adapter on top")
    if merge_option:
        group.add_argument("--merge", action="store_true", help="fold the adapter into the weights after loading (faster per token)")
    group.add_argument("--threads", type=int, default=None, help="CPU threads (default: physical cores)")


def add_hub_arguments(group) -> None:
    """--revision and --trust-remote-code, for every command that loads a model from the Hub."""
    group.add_argument("--revision", default=None, metavar="REV",
                       help="Hub branch, tag or commit of the model (default: the one an adapter records, else main)")
    group.add_argument("--trust-remote-code", action="store_true",
                       help="run the Python code a model repository ships (off by default: it runs on this machine)")


def _add_generation_arguments(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    group = parser.add_argument_group("generation")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="tokens to generate at most (default %(default)s)")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    group.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default %(default)s)")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help=">1 discourages repeats (default %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")


def register(subparsers) -> None:
    fmt = argparse.RawDescriptionHelpFormatter

    generate = subparsers.add_parser(
        "generate", help="answer one prompt with a fine-tuned model", formatter_class=fmt,
        description="Generate a reply to one prompt (formatted with the chat template) and print it.",
        epilog=MODEL_HELP + """
examples:
  cpuft generate --model runs/sft-1 "Explain LoRA in one sentence."
  echo "Write a haiku about CPUs." | cpuft generate --model models/merged --int8 -
  cpuft generate --model models/merged --raw "Once upon a time" --temperature 0.8
""",
    )
    generate.add_argument("prompt", help="the prompt; '-' reads it from stdin")
    generate.add_argument("--system", default=None, help="system message to put before the prompt")
    generate.add_argument("--raw", action="store_true", help="continue the text as is, without the chat template")
    add_model_arguments(generate)
    _add_generation_arguments(generate, max_new_tokens=128)
    generate.set_defaults(handler=run_generate)

    chat = subparsers.add_parser(
        "chat", help="chat with a fine-tuned model (streamed, with history)", formatter_class=fmt,
        description="Interactive chat: each line you type is a user turn; the reply streams as it is"
        " generated; the conversation so far is the context of the next turn. Commands: /reset"
        " forgets the history, /exit (or end of input) quits. Reads stdin, so it can be scripted:"
        " printf 'hi\\n/exit\\n' | cpuft chat --model DIR",
        epilog=MODEL_HELP,
    )
    chat.add_argument("--system", default=None, help="system message for the whole conversation")
    chat.add_argument("--max-history-tokens", type=int, default=2048, help="drop the oldest turns beyond this context (default %(default)s)")
    add_model_arguments(chat)
    _add_generation_arguments(chat, max_new_tokens=256)
    chat.set_defaults(handler=run_chat)

    evaluate = subparsers.add_parser(
        "eval", help="held-out loss, perplexity and sample generations", formatter_class=fmt,
        description="Score the held-out split of a dataset (mean token loss and perplexity) and write"
        " sample generations next to their references. With a run directory the dataset, split,"
        " eval fraction, seed and max length default to the run's, so the rows scored are the ones"
        " training held out.",
        epilog=MODEL_HELP + """
Writes to --out (default RUN_DIR/eval/ for a run directory, else eval-results/<time>/):
  eval.json           loss, perplexity, tokens scored, rows, model, precision, settings
  generations.jsonl   one line per sample: messages (prompt), reference, generation

examples:
  cpuft eval --model runs/sft-1
  cpuft eval --model models/merged --int8 --dataset data/test.jsonl --eval-fraction 1
""",
    )
    evaluate.add_argument("--dataset", default=None, help="sample, a .jsonl/.json/.parquet file or a Hub id (default: the run's)")
    evaluate.add_argument("--dataset-format", default=None, help="row format (default: the run's, else auto)")
    evaluate.add_argument("--split", default=None, help="Hub split (default: the run's, else train)")
    evaluate.add_argument("--eval-fraction", type=float, default=None, help="held-out fraction (default: the run's, else 0.05); 1 scores every row")
    evaluate.add_argument("--max-samples", type=int, default=None, help="read only the first N rows (default: the run's)")
    evaluate.add_argument("--data-seed", type=int, default=None, help="split seed (default: the run's, else 42)")
    evaluate.add_argument("--max-length", type=int, default=None, help="truncate rows to this many tokens (default: the run's, else 512)")
    evaluate.add_argument("--batch-size", type=int, default=4, help="rows per forward pass (default %(default)s)")
    evaluate.add_argument("--assistant-only", action="store_true", help="score the assistant replies only, masked as `cpuft sft --loss-on assistant` trains them (default: every token)")
    evaluate.add_argument("--generations", type=int, default=8, help="sample generations to write (default %(default)s; 0 for none)")
    evaluate.add_argument("--out", default=None, help="output directory (replaced atomically)")
    evaluate.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_model_arguments(evaluate)
    _add_generation_arguments(evaluate, max_new_tokens=64)
    evaluate.set_defaults(handler=run_eval)


# ----------------------------------------------------------------------------- shared


def load_model_from_args(args, quiet: bool = False, machine=None):
    """Probe (unless `machine` is given), plan (device, dtype, threads), resolve and load; prints
    one line saying what it loaded, and a note for every choice that differs from the plan's."""
    import torch

    from cpuft.hardware.probe import probe_machine
    from cpuft.inference.int8 import default_int8_method
    from cpuft.inference.loading import load_for_inference, resolve_source
    from cpuft.planning.plan import PlanRequest, plan_for

    machine = machine or probe_machine()
    int8 = args.int8_method or (default_int8_method(machine) if args.int8 else None)
    device = "cpu" if int8 and args.device == "auto" else args.device
    plan = plan_for(machine, PlanRequest(device=device, dtype=args.dtype, quant="none", threads=args.threads))
    if plan.device == "cpu":
        torch.set_num_threads(plan.threads)
    source = resolve_source(args.model, base=args.base, revision=args.revision, trust_remote_code=args.trust_remote_code)
    loaded = load_for_inference(
        source, dtype=plan.compute_dtype, device=plan.device, int8=int8, nf4=args.nf4, merge=args.merge,
    )
    if not quiet:
        where = f"{plan.device}, {plan.threads} threads" if plan.device == "cpu" else plan.device
        print(f"model: {source.describe()} [{loaded.precision}, {where}]", file=sys.stderr)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
    return loaded


def _settings(args):
    from cpuft.inference.generate import GenerationSettings

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}.")
    if args.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 is greedy), got {args.temperature}.")
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, seed=args.seed,
    )


# ----------------------------------------------------------------------------- generate


def run_generate(args) -> int:
    from cpuft.inference.generate import generate

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise UserError("the prompt is empty.")
    settings = _settings(args)
    loaded = load_model_from_args(args)
    if args.raw:
        print(generate(loaded, settings, text=prompt))
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": prompt}]
        print(generate(loaded, settings, messages=messages))
    return 0


# ----------------------------------------------------------------------------- chat


def run_chat(args) -> int:
    from cpuft.inference.generate import stream

    settings = _settings(args)
    loaded = load_model_from_args(args)
    interactive = sys.stdin.isatty()
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    if interactive:
        print("chat: type a message; /reset forgets the conversation, /exit quits.", file=sys.stderr)
    while True:
        if interactive:
            print("you> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line:  # end of input
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            history.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": text})
        history = _fit_history(loaded.tokenizer, system, history, args.max_history_tokens)
        print("assistant> ", end="", flush=True)
        pieces = []
        for piece in stream(loaded, settings, messages=system + history):
            pieces.append(piece)
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": "".join(pieces).strip()})
    return 0


def _fit_history(tokenizer, system: list[dict], history: list[dict], budget: int) -> list[dict]:
    """Drop the oldest user/assistant pairs until the prompt fits `budget` tokens (the last turn stays)."""
    while len(history) > 1:
        ids = tokenizer.apply_chat_template(system + history, add_generation_prompt=True, tokenize=True, return_dict=True)
        if len(ids["input_ids"]) <= budget:
            break
        history = history[2:]
    return history


# ----------------------------------------------------------------------------- eval


def run_eval(args) -> int:
    from cpuft.artifacts import atomic_directory, atomic_write_json
    from cpuft.data.prepare import prepare_dataset
    from cpuft.inference.evaluate import evaluate_loss, split_prompt_reference
    from cpuft.inference.generate import generate
    from cpuft.inference.loading import is_run_dir

    run_config = _run_config(Path(args.model))
    def pick(value, key, fallback):
        return value if value is not None else run_config.get(key, fallback)

    dataset = pick(args.dataset, "dataset", None)
    if dataset is None:
        raise UserError("--dataset is needed: --model is not a cpuft run directory with a recorded dataset.")
    eval_fraction = pick(args.eval_fraction, "eval_fraction", 0.05)
    if not 0.0 < eval_fraction <= 1.0:
        raise UserError(f"--eval-fraction must be in (0, 1], got {eval_fraction}; 1 scores every row.")
    max_length = pick(args.max_length, "max_length", 512)
    if args.generations < 0 or args.batch_size < 1:
        raise UserError("--generations must be >= 0 and --batch-size >= 1.")
    settings = _settings(args)
    out_dir = Path(args.out) if args.out else (
        RunDir(args.model).eval_dir if is_run_dir(Path(args.model)) else Path("eval-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
    )

    data = prepare_dataset(
        dataset, row_format=pick(args.dataset_format, "dataset_format", "auto"),
        split=pick(args.split, "dataset_split", "train"),
        eval_fraction=eval_fraction if eval_fraction < 1.0 else 0.0,
        max_samples=pick(args.max_samples, "max_samples", None), seed=pick(args.data_seed, "seed", 42),
    )
    rows = list(data.train) if eval_fraction >= 1.0 else (list(data.eval) if data.eval is not None else [])
    if not rows:
        raise UserError(
            f"{dataset}: the held-out split is empty ({data.num_rows} rows, eval fraction {eval_fraction});"
            " raise --eval-fraction, or pass --eval-fraction 1 to score every row."
        )
    loaded = load_model_from_args(args)

    progress = _progress_bar(len(rows), "scoring", disable=args.no_progress)
    result = evaluate_loss(loaded.model, loaded.tokenizer, rows, max_length=max_length, batch_size=args.batch_size,
                           assistant_only=args.assistant_only, progress=progress.update)
    progress.close()
    print(f"eval: {result.rows} rows, {result.tokens} tokens: loss {result.loss:.4f}, perplexity {result.perplexity:.2f}")

    samples = [row for row in rows if "messages" in row][: args.generations]
    generations = []
    progress = _progress_bar(len(samples), "generating", disable=args.no_progress)
    for row in samples:
        prompt, reference = split_prompt_reference(row["messages"])
        generations.append({"messages": prompt, "reference": reference, "generation": generate(loaded, settings, messages=prompt)})
        progress.update(1)
    progress.close()

    summary = {
        "model": args.model, "source": loaded.source.describe(), "precision": loaded.precision,
        "dataset": dataset, "rows": result.rows, "tokens": result.tokens, "loss": result.loss,
        "perplexity": result.perplexity, "scored": "assistant tokens" if args.assistant_only else "all tokens",
        "max_length": max_length, "eval_fraction": eval_fraction, "generations": len(generations),
        "generation_settings": vars(settings),
    }
    with atomic_directory(out_dir) as tmp:
        atomic_write_json(tmp / "eval.json", summary)
        (tmp / "generations.jsonl").write_text("".join(json.dumps(g, ensure_ascii=False) + "\n" for g in generations))
    print(f"written: {out_dir / 'eval.json'}, {out_dir / 'generations.jsonl'} ({len(generations)} generations)")
    return 0


def _run_config(path: Path) -> dict:
    import yaml

    config_file = RunDir(path).config_file
    if not config_file.is_file():
        return {}
    return yaml.safe_load(config_file.read_text()) or {}


def _progress_bar(total: int, label: str, disable: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="row", disable=disable or total == 0, file=sys.stderr)
