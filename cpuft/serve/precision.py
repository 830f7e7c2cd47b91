"""`cpuft serve --dtype auto`: fp32, bf16 or int8, whichever serves a request fastest here, measured.

Why measure: the plan's rule (bf16 on AMX / AVX-512-BF16 CPUs, fp32 elsewhere) is about matmul
throughput, which is what prefill and training are bound by. A decode step is one token (M=1
GEMMs) and reads every weight once, and there the ranking can differ: on the AMD EPYC
(AVX-512-BF16, no AMX) this was written on, torch 2.13's int8 (fbgemm) decoded ~3x faster than
bf16 at Qwen2.5-0.5B's shapes, and bf16 M=1 GEMMs with 2 threads on 2 busy shared cores took
~8 ms each, whatever their size (docs/serve.md, "Choosing the precision"). So the choice is made
by timing this model's own shapes, on this CPU, with the thread count the server will use.

What is measured (a few seconds; cached): the model's config class with ONE decoder layer, its full
vocabulary and random weights, in each candidate precision (int8: `default_int8_method`, its
quantisation timed too): a PROMPT_TOKENS-token prefill (logits of the last token only, as
`generate` does) and DECODE_STEPS decode steps with the KV cache, and the lm_head alone at one
token; rounds interleave the candidates and the median is kept. Scaled to the model's layers
(head + layers x (one-layer step - head)), a request of PROMPT_TOKENS prompt + NEW_TOKENS new tokens
costs prefill + NEW_TOKENS decode steps; the cheapest float precision wins, and int8 wins only if
it is INT8_MARGIN times cheaper than that (it changes the outputs, and quantising costs seconds at
every start: the reason line says how many).

Cached in ~/.cache/cpuft/serve-precision/ (CPUFT_CACHE_DIR overrides the root), keyed by the
config, the candidates, the threads, the int8 method, the CPU and the torch version; delete the
file (the reason line names it) to measure again.

Limits: only for `--dtype auto` on CPU without --int8/--int8-method/--nf4 (an explicit choice is
kept); several adapters (adapters mode) measure fp32 and bf16 only (int8 merges adapters); the
measurement runs while neighbours may share the CPU: a busy machine at start-up can pick a
precision that is not the best on a quiet one (the numbers are in the reason line, and cached).
Random weights: speed only, nothing about accuracy.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPT_TOKENS = 128
NEW_TOKENS = 64
DECODE_STEPS = 8
ROUNDS = 3
# int8 is taken only this much cheaper per request than the best float precision: it changes the
# outputs (it is not the model the run trained), so a near-tie keeps the exact weights.
INT8_MARGIN = 1.25
CACHE_VERSION = 1


@dataclass(frozen=True)
class PrecisionCost:
    """Seconds for the whole model, scaled from the one-layer measurement."""

    name: str  # "fp32", "bf16", "int8"
    dtype: str  # the model dtype it runs in (int8: its activations')
    prefill_seconds: float  # PROMPT_TOKENS tokens
    decode_seconds: float  # one token, batch 1
    setup_seconds: float  # quantising (int8), scaled to the whole model; 0 otherwise

    @property
    def request_seconds(self) -> float:
        return self.prefill_seconds + NEW_TOKENS * self.decode_seconds


@dataclass(frozen=True)
class PrecisionChoice:
    name: str  # "fp32", "bf16" or "int8"
    dtype: str  # what --dtype becomes
    reason: str
    costs: tuple[PrecisionCost, ...]


def cache_dir() -> Path:
    return Path(os.environ.get("CPUFT_CACHE_DIR") or Path.home() / ".cache" / "cpuft") / "serve-precision"


def choose(costs: list[PrecisionCost]) -> tuple[PrecisionCost, str]:
    """The cheapest per request of the float precisions, or int8 when INT8_MARGIN times cheaper
    than that; (winner, why in words)."""
    floats = [c for c in costs if c.name != "int8"]
    best_float = min(floats, key=lambda c: c.request_seconds)
    int8 = next((c for c in costs if c.name == "int8"), None)
    if int8 is None:
        return best_float, "the cheaper per request"
    ratio = best_float.request_seconds / int8.request_seconds
    if ratio >= INT8_MARGIN:
        return int8, (f"int8 is {ratio:.2f}x cheaper per request than {best_float.name} (needs {INT8_MARGIN}x);"
                      f" quantising adds ~{int8.setup_seconds:.0f} s to the start")
    return best_float, f"int8 is {ratio:.2f}x {best_float.name}'s speed per request, under the {INT8_MARGIN}x it needs"


def choose_precision(model_config, threads: int, int8_method: str | None, float_dtypes: tuple[str, ...] = ("fp32", "bf16"),
                     log=None) -> PrecisionChoice:
    """Measure (or read the cached measurement of) each candidate, choose, and say why.
    `int8_method` None leaves int8 out."""
    import torch

    from cpuft.artifacts import atomic_write_json
    from cpuft.inference.int8 import int8_model_dtype

    candidates = [(name, name) for name in float_dtypes]
    if int8_method:
        # The activations' dtype the int8 path would run in (torch-dynamic: fp32 only).
        candidates.append(("int8", int8_model_dtype(int8_method, float_dtypes[-1])[0]))
    key = {
        "version": CACHE_VERSION, "config": model_config.to_dict(), "candidates": candidates, "threads": threads,
        "int8_method": int8_method, "prompt_tokens": PROMPT_TOKENS, "torch": torch.__version__,
        "cpu": _cpu_identity(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    path = cache_dir() / f"{digest}.json"
    costs = None
    if path.is_file():
        try:
            costs = [PrecisionCost(**entry) for entry in json.loads(path.read_text())["costs"]]
            where = f"measured earlier, cached in {path}"
        except (ValueError, TypeError, KeyError):
            costs = None  # unreadable or older: measure again and overwrite it
    if costs is None:
        if log:
            log(f"measuring {', '.join(name for name, _ in candidates)} at this model's shapes ({threads} threads; once, then cached) ...")
        started = time.perf_counter()
        costs = measure_costs(model_config, candidates, threads, int8_method)
        where = f"measured now in {time.perf_counter() - started:.0f} s, cached in {path}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {"key": key, "costs": [asdict(c) for c in costs]})
        except OSError:
            where = f"measured now in {time.perf_counter() - started:.0f} s (not cached: {path.parent} is not writable)"
    winner, why = choose(costs)
    table = ", ".join(f"{c.name} {c.request_seconds:.2f} s (prefill {PROMPT_TOKENS / c.prefill_seconds:.0f} tokens/s,"
                      f" decode {1 / c.decode_seconds:.1f} tokens/s)" for c in costs)
    reason = (f"auto: {winner.name}, {why}. Per request of {PROMPT_TOKENS} prompt + {NEW_TOKENS} new tokens, batch 1,"
              f" {threads} threads: {table}; {where}")
    return PrecisionChoice(winner.name, winner.dtype, reason, tuple(costs))


def _cpu_identity() -> str:
    """The CPU's model name and its flags: what decides which kernels torch runs."""
    name, flags = "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not name:
                name = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = hashlib.sha256(line.encode()).hexdigest()[:12]
    except OSError:
        import platform

        name = platform.processor()
    return f"{name} {flags}"


def measure_costs(model_config, candidates: list[tuple[str, str]], threads: int, int8_method: str | None) -> list[PrecisionCost]:
    """Time every candidate on a one-layer copy of the model (module docstring); restores the
    thread count."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        reference = _one_layer_model(model_config)
        models, setup = {}, {}
        for name, dtype in candidates:
            models[name], setup[name] = _as_candidate(reference, name, dtype, int8_method)
        del reference
        samples: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _ in candidates}
        for name, _ in candidates:
            _time_once(models[name], steps=2)  # warm-up: oneDNN primitives, allocator growth
        for _ in range(ROUNDS):
            for name, _ in candidates:
                samples[name].append(_time_once(models[name], steps=DECODE_STEPS))
    finally:
        torch.set_num_threads(previous_threads)
    layers = int(model_config.num_hidden_layers)
    costs = []
    for name, dtype in candidates:
        prefill, decode, head = (statistics.median(s[i] for s in samples[name]) for i in range(3))
        # Everything but the head is the one layer (embedding lookup and final norm are noise
        # next to it); floor it at a tenth of the measured step so noise cannot make it free.
        costs.append(PrecisionCost(
            name=name, dtype=dtype,
            prefill_seconds=head + layers * max(prefill - head, prefill / 10),
            decode_seconds=head + layers * max(decode - head, decode / 10),
            setup_seconds=setup[name] * _parameter_ratio(model_config),
        ))
    return costs


def _one_layer_model(model_config):
    """The config's model class with one layer, its full vocabulary and random weights, fp32."""
    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model_config)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = list(config.layer_types[:1])
    config.tie_word_embeddings = True  # the head's speed is the same; half the memory
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _as_candidate(reference, name: str, dtype: str, int8_method: str | None):
    """(a copy of `reference` in `dtype`, quantised for int8; seconds the quantisation took)."""
    from cpuft.dtypes import torch_dtype

    if name == "fp32":
        return reference, 0.0  # the others are copies: one model less in memory
    model = copy.deepcopy(reference).to(torch_dtype(dtype))
    if name != "int8":
        return model, 0.0
    from cpuft.inference.int8 import quantize_for_cpu_inference

    started = time.perf_counter()
    quantize_for_cpu_inference(model, int8_method)
    return model, time.perf_counter() - started


def apply_measured_precision(args, model_path: str, int8_allowed: bool) -> str | None:
    """For `--dtype auto` on CPU (no --int8/--int8-method/--nf4): measure, then set args.dtype
    (and args.int8 when int8 wins) to the choice; returns the reason line, or None where the
    choice is the user's or the plan's (another device, a model this cannot build)."""
    import sys

    from transformers import AutoConfig

    from cpuft.hardware.probe import probe_machine
    from cpuft.inference.int8 import default_int8_method
    from cpuft.inference.loading import resolve_source
    from cpuft.planning.plan import PlanRequest, plan_for

    if args.dtype != "auto" or args.int8 or args.int8_method or args.nf4:
        return None
    machine = probe_machine()
    plan = plan_for(machine, PlanRequest(device=args.device, dtype="auto", quant="none", threads=args.threads))
    if plan.device != "cpu":
        return None
    source = resolve_source(model_path, base=args.base, revision=args.revision, trust_remote_code=args.trust_remote_code)
    try:
        config = AutoConfig.from_pretrained(source.model, **source.pretrained_kwargs())
        choice = choose_precision(config, plan.threads, default_int8_method(machine) if int8_allowed else None,
                                  log=lambda line: print(f"precision: {line}", file=sys.stderr, flush=True))
    except Exception as exc:  # noqa: BLE001 - an encoder-decoder, remote code, a config transformers cannot build alone
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"auto: the plan's {plan.compute_dtype} (could not measure at this model's shapes: {first})"
    args.dtype = choice.dtype
    if choice.name == "int8":
        args.int8 = True
    return choice.reason


def _parameter_ratio(model_config) -> float:
    """Whole model's linear weights over the one-layer model's (for scaling quantisation time)."""
    hidden = int(model_config.hidden_size)
    vocab = int(model_config.vocab_size)
    layer = 12 * hidden * hidden  # attention 4h^2 + MLP ~8h^2: a rough count is enough for a note
    inner = getattr(model_config, "intermediate_size", None)
    if isinstance(inner, int):
        layer = 4 * hidden * hidden + 3 * hidden * inner
    layers = int(model_config.num_hidden_layers)
    return (layers * layer + vocab * hidden) / (layer + vocab * hidden)


def _time_once(model, steps: int) -> tuple[float, float, float]:
    """(prefill seconds, seconds per decode step, seconds of the head alone at one token)."""
    import torch

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        start = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        prefill = time.perf_counter() - start
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        start = time.perf_counter()
        for _ in range(steps):
            out = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        decode = (time.perf_counter() - start) / steps
        hidden = torch.zeros(1, 1, model.config.hidden_size, dtype=next(model.get_input_embeddings().parameters()).dtype)
        head = model.get_output_embeddings()
        start = time.perf_counter()
        for _ in range(steps):
            head(hidden)
        head_seconds = (time.perf_counter() - start) / steps
    return prefill, decode, head_seconds
