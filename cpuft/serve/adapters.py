"""Several LoRA adapters over one base model: which MODEL arguments mean adapters mode, their
names, the one-base check, and loading / unloading adapters on the live model.

`cpuft serve RUN_A RUN_B` or `cpuft serve a=RUN_A b=RUN_B` (run directories or adapter
directories alike): the base is loaded once (`load_for_inference`, unmerged), every adapter is put
on it with PEFT's `load_adapter` under an internal name, and each is served under its own name:
NAME when given, else the run directory's name (for a run's adapter/ or checkpoint-N/, the run's
name, plus "-checkpoint-N" for a checkpoint).

Refused at start-up (UserError, exit 2): a MODEL that is not an adapter (a full model has no
base to share), adapters recorded on different base models (the message names both), a name
given twice, an adapter other than LoRA (PEFT's mixed-adapter batches, `adapter_names`, are
LoRA's), --int8 (it merges the one adapter into the base; adapters mode keeps them apart).

Limits: adapters stay unmerged, so every token pays the LoRA matmuls (a single positional MODEL
still merges, as before); the base itself is not served under a name of its own; all adapters
must use the base's vocabulary size (an adapter that grew the embeddings is refused).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from cpuft.errors import UserError
from cpuft.inference.generate import stop_token_ids
from cpuft.inference.loading import (
    ModelSource,
    adapter_method,
    check_adapter_fits,
    load_for_inference,
    load_tokenizer,
    resolve_source,
)
from cpuft.serve.engine import ServedModel

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")  # what NAME=PATH accepts as NAME
MIXED_BATCH_METHODS = ("LORA",)


def adapters_mode(models: list[str]) -> bool:
    """Several MODELs, or one given as NAME=PATH: serve adapters over one base, unmerged."""
    return len(models) > 1 or any(_split_spec(spec)[0] is not None for spec in models)


def _split_spec(spec: str) -> tuple[str | None, str]:
    name, sep, path = spec.partition("=")
    if sep and name and NAME_PATTERN.match(name) and not Path(spec).exists():
        return name, path
    return None, spec


def default_name(path: str) -> str:
    """A run directory's name; for its adapter/ or checkpoint-N/, the run's (plus the checkpoint)."""
    resolved = Path(path).expanduser().resolve()
    if resolved.name == "adapter":
        return resolved.parent.name
    if re.fullmatch(r"checkpoint-\d+", resolved.name):
        return f"{resolved.parent.name}-{resolved.name}"
    return resolved.name


def parse_specs(models: list[str]) -> list[tuple[str, str]]:
    """MODEL arguments -> [(served name, path)], names unique."""
    named: list[tuple[str, str]] = []
    for spec in models:
        name, path = _split_spec(spec)
        if "=" in spec and name is None and not Path(spec).exists():
            raise UserError(f"'{spec}': a name before '=' may hold letters, digits and . _ : - (and start with a letter or digit).")
        named.append((name or default_name(path), path))
    seen: dict[str, str] = {}
    for name, path in named:
        if name in seen:
            raise UserError(f"two adapters would be served as '{name}' ({seen[name]} and {path}); name them: NAME=PATH.")
        seen[name] = path
    return named


class AdapterLoader:
    """Puts adapters on (and takes them off) the one PeftModel; called by the engine's worker
    thread only (between batches), and at start-up."""

    def __init__(self, base: ModelSource, vocabulary: int, args):
        self.base = base  # the first adapter's source: its base model and revision are the server's
        self.vocabulary = vocabulary
        self.args = args
        self.count = 0

    def resolve(self, name: str, path: str) -> ModelSource:
        """The adapter's source, checked to be a LoRA adapter of this server's base."""
        source = resolve_source(path, base=self.args.base, revision=self.args.revision, trust_remote_code=self.args.trust_remote_code)
        return self.check(name, path, source)

    def check(self, name: str, path: str, source: ModelSource) -> ModelSource:
        if source.kind != "adapter":
            raise UserError(f"{name}={path} is a full model, not an adapter: serving several models over one base"
                            " takes adapters (a cpuft run directory, its adapter/ or a checkpoint-N/).")
        if source.merged_first is not None:
            raise UserError(
                f"{name}={path} was trained (cpuft dpo) on top of the SFT run {source.merged_first.parent}: its base is"
                " that SFT model, not a base another adapter can share. Serve it on its own (cpuft serve PATH merges"
                " both), or `cpuft merge` the SFT run and serve adapters of the merged model."
            )
        if (source.model, source.revision) != (self.base.model, self.base.revision):
            raise UserError(
                f"{name}={path} was trained on {_describe_base(source)}, but this server's base is"
                f" {_describe_base(self.base)} (from {self.base.given}); one server serves adapters of one base model."
            )
        method = adapter_method(source.adapter_dir)
        if method not in MIXED_BATCH_METHODS:
            raise UserError(f"{name}={path} is a {method.lower()} adapter; several adapters in one server must be LoRA"
                            " (PEFT batches requests of different adapters for LoRA only). Serve it on its own: cpuft serve PATH.")
        return source

    def load(self, model, name: str, path: str) -> ServedModel:
        return self.attach(model, name, self.resolve(name, path))

    def attach(self, model, name: str, source: ModelSource) -> ServedModel:
        tokenizer = load_tokenizer(source)
        if len(tokenizer) > self.vocabulary:
            raise UserError(f"the adapter {name} ({source.adapter_dir}) uses {len(tokenizer)} tokens, more than the served"
                            f" base's {self.vocabulary}; serve it on its own: cpuft serve {source.given}.")
        check_adapter_fits(source.adapter_dir, model.get_base_model())
        internal = f"adapter_{self.count}"
        self.count += 1
        try:
            model.load_adapter(str(source.adapter_dir), adapter_name=internal)
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            raise UserError(f"PEFT cannot load the adapter in {source.adapter_dir}: {exc}".splitlines()[0]) from None
        model.eval()
        return ServedModel(name, tokenizer, frozenset(stop_token_ids(tokenizer, model)), internal, str(source.adapter_dir))

    def unload(self, model, served: ServedModel) -> None:
        model.delete_adapter(served.adapter)


def _describe_base(source: ModelSource) -> str:
    return source.model + (f" (revision {source.revision})" if source.revision else "")


def load_adapters(args, models: list[str], quiet: bool = False):
    """Plan, load the base once with the first adapter, put the others on it; returns
    (LoadedModel, [ServedModel], AdapterLoader). Every check runs before any weight is read."""
    import torch

    from cpuft.hardware.probe import probe_machine
    from cpuft.planning.plan import PlanRequest, plan_for

    if args.int8 or args.int8_method:
        raise UserError("--int8 merges an adapter into the base, and several adapters must stay apart:"
                        " serve one adapter with --int8 (cpuft serve RUN --int8), or several without it.")
    specs = parse_specs(models)
    sources = []
    for name, path in specs:
        source = resolve_source(path, base=args.base, revision=args.revision, trust_remote_code=args.trust_remote_code)
        if source.kind != "adapter":
            raise UserError(f"{name}={path} is a full model, not an adapter: serving several models over one base"
                            " takes adapters (a cpuft run directory, its adapter/ or a checkpoint-N/).")
        sources.append(source)
    first_name = specs[0][0]
    checker = AdapterLoader(sources[0], vocabulary=0, args=args)
    for (name, path), source in zip(specs, sources):
        checker.check(name, path, source)

    from cpuft.serve.precision import apply_measured_precision

    # After every check, so a refusal stays instant; int8 is no candidate: it merges the adapter.
    reason = apply_measured_precision(args, specs[0][1], int8_allowed=False)
    if reason and not quiet:
        print(f"precision: {reason}", file=sys.stderr, flush=True)
    machine = probe_machine()
    plan = plan_for(machine, PlanRequest(device=args.device, dtype=args.dtype, quant="none", threads=args.threads))
    if plan.device == "cpu":
        torch.set_num_threads(plan.threads)
    loaded = load_for_inference(sources[0], dtype=plan.compute_dtype, device=plan.device, nf4=args.nf4, merge=False)
    model = loaded.model
    loader = AdapterLoader(sources[0], vocabulary=model.get_input_embeddings().weight.shape[0], args=args)
    # load_for_inference put the first adapter on as PEFT's "default"; rename it in our scheme by
    # loading it afresh would cost a second read, so it keeps that internal name.
    served = [ServedModel(first_name, loaded.tokenizer, frozenset(stop_token_ids(loaded.tokenizer, model)), "default",
                          str(sources[0].adapter_dir))]
    for (name, _), source in zip(specs[1:], sources[1:]):
        served.append(loader.attach(model, name, source))
    if not quiet:
        where = f"{plan.device}, {plan.threads} threads" if plan.device == "cpu" else plan.device
        print(f"model: {sources[0].model} + {len(served)} LoRA adapters [{loaded.precision}, {where}]", file=sys.stderr)
        for entry in served:
            print(f"  {entry.name}: {entry.source}", file=sys.stderr)
        for warning in plan.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        for note in loaded.notes:
            print(f"note: {note}", file=sys.stderr)
    return loaded, served, loader
