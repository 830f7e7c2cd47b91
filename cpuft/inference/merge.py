"""Fold PEFT adapters into their base model and save a stock transformers model directory.

Mergeable: the weight-change methods cpuft trains, LoRA, LoHa, LoKr, IA3 and AdaLoRA (PEFT
`merge_and_unload` folds each into W: LoRA W + scaling * B @ A, LoHa/LoKr their Hadamard/Kronecker
products, IA3 a per-channel scale). Several adapters with weights (LoRA):
PEFT's `add_weighted_adapter` builds one combined adapter first, then it is merged. The default
combination, `cat`, stacks the adapters' matrices so that the merged weight is exactly
W + sum_i weight_i * delta_i (rank = sum of ranks); `svd` truncates that sum back to the largest
rank; `linear`, `ties`, `dare_*` and `magnitude_prune` are PEFT's approximate task-arithmetic
methods (same rank required; `density` for the pruning ones).

The output loads with plain `AutoModelForCausalLM.from_pretrained(out)` (AutoModelForSeq2SeqLM
for T5/mT5; no cpuft, no PEFT): the weights (safetensors), config.json, generation_config.json, the tokenizer, and
`cpuft_merge.json` recording the adapters, weights and combination it was made from. It is
written to a temporary directory and renamed into place, so `out` is never half-written.

Limits: all adapters must share one base model (checked by module shapes, and by the recorded
base unless `base` overrides it). Merging in fp32 is exact up to float rounding; `dtype=bf16`
rounds the merged weights to bf16. Prompt/prefix tuning and p-tuning adapters are virtual
tokens, not weight deltas: refused with a UserError that names the method and says to use them
unmerged (`cpuft generate|chat|eval|serve` take the adapter as it is). Weighted combinations
(`add_weighted_adapter`) are PEFT's for LoRA only: other methods merge one adapter at weight 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cpuft.dtypes import torch_dtype
from cpuft.errors import UserError, first_line
from cpuft.inference.loading import (
    ADAPTER_METHODS,
    PROMPT_LEARNING_TYPES,
    ModelSource,
    adapter_method,
    apply_adapter,
    check_adapter_fits,
    grow_embeddings_to_tokenizer,
    load_tokenizer,
    resolve_source,
)

COMBINATIONS = ("cat", "svd", "linear", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
NEEDS_DENSITY = ("ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune")
PROVENANCE_FILE = "cpuft_merge.json"


@dataclass(frozen=True)
class WeightedAdapter:
    source: ModelSource
    weight: float = 1.0


@dataclass(frozen=True)
class MergeResult:
    out_dir: Path
    base_model: str
    adapters: list[dict[str, Any]]
    combination: str | None  # None: a single adapter merged as is
    parameters: int
    auto_class: str  # the transformers Auto class that loads the output (AutoModelForCausalLM / ...Seq2SeqLM)


def resolve_adapters(
    given: list[str], weights: list[float] | None, base: str | None, revision: str | None = None,
    trust_remote_code: bool = False,
) -> list[WeightedAdapter]:
    """Resolve each path (run dir or adapter dir) and pair it with its weight (default 1 each)."""
    if not given:
        raise UserError("name at least one run directory or adapter directory to merge.")
    if weights is not None and len(weights) != len(given):
        raise UserError(f"--weights has {len(weights)} values for {len(given)} adapters; give one weight per adapter.")
    adapters = []
    for index, path in enumerate(given):
        source = resolve_source(path, base=base, revision=revision, trust_remote_code=trust_remote_code)
        if source.kind != "adapter":
            raise UserError(f"{path} is a full model, not an adapter or run directory: there is nothing to merge.")
        adapters.append(WeightedAdapter(source, weights[index] if weights is not None else 1.0))
    bases = {a.source.model for a in adapters}
    if len(bases) > 1:
        listing = "; ".join(f"{a.source.given} -> {a.source.model}" for a in adapters)
        raise UserError(
            f"these adapters were trained on different base models ({listing}); a weighted merge needs"
            " one base. If they are copies of the same model, pass --base MODEL to use it for all."
        )
    return adapters


def merge_adapters(
    adapters: list[WeightedAdapter],
    out_dir: str | Path,
    combination: str = "cat",
    density: float | None = None,
    dtype: str = "fp32",
    log=print,
) -> MergeResult:
    """Merge `adapters` into their shared base model and save the result to `out_dir` atomically."""
    from peft import PeftModel
    from transformers import AutoConfig

    from cpuft.artifacts import atomic_directory, atomic_write_json
    from cpuft.planning.architecture import auto_model_class

    if combination not in COMBINATIONS:
        raise UserError(f"unknown combination {combination!r}; choose one of: {', '.join(COMBINATIONS)}.")
    if combination in NEEDS_DENSITY and density is None:
        raise UserError(f"combination {combination} prunes the adapters: give --density (0 < d <= 1, e.g. 0.5).")
    out_dir = Path(out_dir)
    for adapter in adapters:
        _check_mergeable(adapter.source.adapter_dir)
    single_as_is = len(adapters) == 1 and adapters[0].weight == 1.0
    methods = {adapter_method(a.source.adapter_dir) for a in adapters}
    if not single_as_is and methods != {"LORA"}:
        names = ", ".join(sorted(ADAPTER_METHODS.get(m, m.lower()) for m in methods))
        raise UserError(
            f"a weighted merge combines LoRA adapters only (PEFT's add_weighted_adapter); these are {names}."
            " Merge one adapter at a time at weight 1, without --weights."
        )
    _check_out_dir(out_dir, adapters)
    base_name = adapters[0].source.model
    tokenizer = load_tokenizer(adapters[0].source)
    log(f"loading base model {base_name}")
    try:
        hub = adapters[0].source.pretrained_kwargs()
        model_class = auto_model_class(AutoConfig.from_pretrained(base_name, **hub))
        model = model_class.from_pretrained(base_name, dtype=torch_dtype(dtype), **hub)
    except Exception as exc:
        raise UserError(f"cannot load the base model '{base_name}': {first_line(exc)}") from None
    grow_embeddings_to_tokenizer(model, tokenizer)
    names = [f"adapter_{i}" for i in range(len(adapters))]
    for name, adapter in zip(names, adapters):
        check_adapter_fits(adapter.source.adapter_dir, model)
    if single_as_is:
        model = apply_adapter(model, adapters[0].source.adapter_dir, adapter_name=names[0])
    else:
        model = PeftModel.from_pretrained(model, str(adapters[0].source.adapter_dir), adapter_name=names[0])
        for name, adapter in zip(names[1:], adapters[1:]):
            model.load_adapter(str(adapter.source.adapter_dir), adapter_name=name)

    if single_as_is:
        active, used_combination = names[0], None
    else:
        _check_ranks(model, names, combination)
        active, used_combination = "combined", combination
        log(f"combining {len(adapters)} adapter(s) with weights {[a.weight for a in adapters]} ({combination})")
        try:
            model.add_weighted_adapter(
                names, [a.weight for a in adapters], active, combination_type=combination, density=density
            )
        except ValueError as exc:  # PEFT's own checks: modules_to_save overlaps, ranks, ...
            raise UserError(f"PEFT cannot combine these adapters with {combination}: {exc}") from None
    model.set_adapter(active)
    log("merging into the base weights")
    merged = model.merge_and_unload(adapter_names=[active])
    parameters = sum(p.numel() for p in merged.parameters())
    record = [
        {"adapter": str(a.source.adapter_dir), "given": a.source.given, "weight": a.weight} for a in adapters
    ]
    with atomic_directory(out_dir) as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PROVENANCE_FILE, {
            "base_model": base_name, "adapters": record, "combination": used_combination,
            "density": density, "dtype": dtype,
        })
    return MergeResult(out_dir, base_name, record, used_combination, parameters, model_class.__name__)


def _check_mergeable(adapter_dir: Path) -> None:
    """UserError for adapters with no weights to fold in: prompt learning adds virtual tokens."""
    method = adapter_method(Path(adapter_dir))
    if method in PROMPT_LEARNING_TYPES:
        raise UserError(
            f"the adapter in {adapter_dir} is {ADAPTER_METHODS[method]}, which trains virtual tokens put"
            " before the input, not changes to the weights, so there is nothing to merge. Use the"
            f" adapter unmerged: `cpuft generate --model {adapter_dir}` (likewise chat, eval and"
            " serve) loads it as it is."
        )


def _check_out_dir(out_dir: Path, adapters: list[WeightedAdapter]) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UserError(f"{out_dir} already exists and is not empty; choose another --out (cpuft will not overwrite it).")
    for adapter in adapters:
        inside = adapter.source.adapter_dir
        if out_dir.resolve() == inside or inside in out_dir.resolve().parents:
            raise UserError(f"--out {out_dir} lies inside the adapter directory {inside}; write the merged model elsewhere.")


def _check_ranks(model, names: list[str], combination: str) -> None:
    if combination in ("cat", "svd", "ties_svd"):
        return  # these take adapters of any rank
    ranks = {name: model.peft_config[name].r for name in names}
    if len(set(ranks.values())) > 1:
        raise UserError(
            f"combination {combination} needs adapters of one rank, these have ranks {sorted(ranks.values())};"
            " use --combination cat (exact) or svd."
        )
