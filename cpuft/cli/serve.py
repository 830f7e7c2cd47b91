"""`cpuft serve`: load a fine-tune once and answer OpenAI-style HTTP requests (FastAPI + uvicorn).

Parses and checks the flags, loads the model the way `cpuft generate` does (probe, plan, resolve,
load; one MODEL's adapter is merged; `--dtype auto` is decided by measuring fp32, bf16 and int8
at the model's shapes, cpuft.serve.precision), or, for several adapters (`cpuft serve RUN_A RUN_B`,
`cpuft serve a=RUN_A`), the base once with every adapter unmerged on it (cpuft.serve.adapters),
then hands off to cpuft.serve. Binds 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import os
import socket
import sys
from pathlib import Path

from cpuft.errors import UserError

API_KEY_ENV = "CPUFT_API_KEY"

USAGE = """%(prog)s [-h] [options] MODEL
       %(prog)s [-h] [options] [NAME=]ADAPTER [[NAME=]ADAPTER ...]"""

EPILOG = f"""\
MODEL takes: a cpuft run directory (uses its adapter/, merged into the base at load), an adapter
directory (adapter/ or checkpoint-N/), a merged model directory (`cpuft merge`), or any causal
LM directory / Hub id. Every adapter `cpuft sft` trains loads; prompt, prefix and p-tuning
adapters (virtual tokens) stay unmerged. --dtype auto (the default) measures fp32, bf16 and int8 at the
model's shapes on a one-layer copy (seconds, once per machine and shape: cached in
~/.cache/cpuft/serve-precision) and serves in the one that answers a request fastest, int8 only
when 1.25x faster (it changes the outputs); the reason is printed. --dtype fp32|bf16 or --int8
(docs/int8.md) choose yourself.

Several LoRA adapters of one base model in one process: `cpuft serve RUN_A RUN_B` (served under
each run directory's name) or `cpuft serve a=RUN_A b=RUN_B` (named; also for one adapter). The
base is loaded once, the adapters stay unmerged, a request's "model" picks its adapter, and
requests for different adapters are batched together. Adapters of different base models are
refused. With --api-key, POST /v1/load_lora_adapter {{"lora_name", "lora_path"}} and
/v1/unload_lora_adapter {{"lora_name"}} add and remove adapters while it runs.

API (OpenAI's wire format; docs/serve.md lists the fields):
  POST /v1/chat/completions   messages -> reply; "stream": true for server-sent events
  POST /v1/completions        prompt (plain text, no chat template) -> continuation
  GET  /v1/models             the models served (--served-model-name, or each adapter's name)
  GET  /health                status, queue and counters (no API key needed)

Limits: prompt + max_tokens must fit the context (--max-model-len), else 400; when
--max-queue requests already wait for the model, new ones get 429 (Retry-After: 1). Greedy
requests (temperature 0) waiting together run as one batch of up to --max-batch-size.

On a GCP VM: the server listens on 127.0.0.1 only, so reach it through an SSH tunnel from your
own machine (IAP: the VM needs no external IP and no open port):
  gcloud compute ssh VM --zone ZONE --tunnel-through-iap -- -L 8000:127.0.0.1:8000
leave that open, then on your machine:
  curl http://127.0.0.1:8000/v1/models -H "Authorization: Bearer KEY"
  curl http://127.0.0.1:8000/v1/chat/completions -H "Authorization: Bearer KEY" \\
       -H "Content-Type: application/json" \\
       -d '{{"model": "runs/sft-1", "messages": [{{"role": "user", "content": "Hi"}}]}}'
  or, in Python: openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
(Without --api-key any key, or no header, will do.) --host 0.0.0.0 exposes the
server to the network: only with --api-key, and behind a firewall you control.

examples:
  cpuft serve runs/sft-1
  {API_KEY_ENV}=$(openssl rand -hex 16) cpuft serve runs/sft-1 --port 8001
  cpuft serve models/merged --int8 --max-batch-size 4 --max-queue 8
  cpuft serve runs/support runs/sql runs/summaries          # three adapters, one base
  cpuft serve support=runs/sft-3 sql=runs/sft-7/checkpoint-400 --api-key KEY
"""


def register(subparsers) -> None:
    from cpuft.cli.infer import add_model_arguments

    parser = subparsers.add_parser(
        "serve", help="serve a fine-tune (or several adapters of one base) over an OpenAI-compatible HTTP API",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG, usage=USAGE,
        description="Load the model once and answer /v1/chat/completions and /v1/completions"
        " (streamed or not), /v1/models and /health until interrupted (Ctrl-C).",
    )
    add_model_arguments(parser, model_positional=True, merge_option=False)
    _take_several_models(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s: this machine only)")
    server.add_argument("--port", type=int, default=8000, help="TCP port (default %(default)s; 0 picks a free one and prints it)")
    server.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV}, else no key)")
    server.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL as given)")
    server.add_argument("--max-batch-size", type=int, default=8, help="greedy requests generated together at most (default %(default)s)")
    server.add_argument("--max-queue", type=int, default=16, help="requests that may wait for the model; more get 429 (default %(default)s)")
    server.add_argument("--max-model-len", type=int, default=None, help="context length: prompt + max_tokens (default: the model's)")
    server.add_argument("--default-max-tokens", type=int, default=256, help="max_tokens when a request names none (default %(default)s)")
    server.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level; info logs every request (default %(default)s)")
    parser.set_defaults(handler=run_serve)


class _ModelList(argparse.Action):
    """MODEL [MODEL ...]: `args.models` holds them all, `args.model` the first (as generate's --model)."""

    def __call__(self, parser, namespace, values, option_string=None):
        namespace.models = list(values)
        namespace.model = values[0]


def _take_several_models(parser: argparse.ArgumentParser) -> None:
    """Swap add_model_arguments' one positional MODEL for MODEL [MODEL ...] (adapters mode)."""
    single = next(action for action in parser._actions if action.dest == "model")
    parser._remove_action(single)
    for group in parser._action_groups:
        if single in group._group_actions:
            group._group_actions.remove(single)
    parser.add_argument("model", nargs="+", action=_ModelList, metavar="MODEL",
                        help=single.help + "; or several LoRA adapters of one base: [NAME=]ADAPTER ...")


def run_serve(args) -> int:
    _check_arguments(args)
    missing = [name for name in ("fastapi", "uvicorn") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"cpuft serve needs {' and '.join(missing)}: pip install 'cpuft[serve]'.")
    listener = _listen(args.host, args.port)  # before loading: a taken port fails in a second, not after a minute

    import uvicorn

    from cpuft.cli.infer import load_model_from_args
    from cpuft.serve.adapters import adapters_mode, load_adapters
    from cpuft.serve.app import ServeConfig, create_app
    from cpuft.serve.engine import Engine
    from cpuft.serve.precision import apply_measured_precision

    models = getattr(args, "models", None) or [args.model]
    if adapters_mode(models):
        if args.served_model_name:
            raise UserError("--served-model-name names the one model; with several adapters name each: NAME=PATH.")
        loaded, served, loader = load_adapters(args, models)
        names = [entry.name for entry in served]
        engine = Engine(loaded, max_batch_size=args.max_batch_size, max_queue=args.max_queue, served=served, adapters=loader)
    else:
        args.merge = True  # merged weights are faster per token; nf4 keeps the adapter apart (loader note)
        reason = apply_measured_precision(args, args.model, int8_allowed=True)
        if reason:
            print(f"precision: {reason}", file=sys.stderr, flush=True)
        loaded = load_model_from_args(args)
        names = [args.served_model_name or args.model]
        engine = Engine(loaded, max_batch_size=args.max_batch_size, max_queue=args.max_queue, model_name=names[0])
    config = ServeConfig(
        model_name=", ".join(names), context_length=_context_length(loaded.model, args.max_model_len),
        default_max_tokens=args.default_max_tokens, api_key=args.api_key or None,
    )
    app = create_app(engine, config)
    host, port = listener.getsockname()[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving '{config.model_name}' on http://{url_host}:{port}/v1 (context {config.context_length} tokens,"
          f" batch <= {engine.max_batch_size}, queue <= {engine.max_queue}, API key {'required' if config.api_key else 'off'})",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[listener])
    return 0


def _check_arguments(args) -> None:
    for flag, value, least in (("--max-batch-size", args.max_batch_size, 1), ("--max-queue", args.max_queue, 1),
                               ("--default-max-tokens", args.default_max_tokens, 1)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}.")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise UserError(f"--max-model-len must be at least 2, got {args.max_model_len}.")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}.")
    if args.api_key is not None and not args.api_key.strip():
        raise UserError(f"--api-key (or ${API_KEY_ENV}) is empty; pass a key or leave it unset.")
    from cpuft.serve.adapters import _split_spec

    for spec in getattr(args, "models", None) or [args.model]:
        path = _split_spec(spec)[1]
        if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise UserError(f"model {path} does not exist.")
    if not _is_loopback(args.host) and not args.api_key:
        print(f"cpuft serve: warning: --host {args.host} without --api-key lets anyone who can reach this"
              " machine use the model.", file=sys.stderr)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as exc:
        listener.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror}. Pass another --port (0 picks a free one).") from None
    listener.listen(128)
    listener.set_inheritable(True)
    return listener


def _context_length(model, max_model_len: int | None) -> int:
    config = model.config
    native = next((getattr(config, name) for name in ("max_position_embeddings", "n_positions", "max_sequence_length")
                   if isinstance(getattr(config, name, None), int)), None)
    if max_model_len is None:
        if native is None:
            raise UserError("the model's config names no context length; pass --max-model-len.")
        return native
    if native is not None and max_model_len > native:
        raise UserError(f"--max-model-len {max_model_len} is beyond the model's context ({native} positions).")
    return max_model_len
