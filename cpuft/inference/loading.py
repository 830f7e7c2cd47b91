"""Load a fine-tune for answering: resolve what `--model` names, load base + PEFT adapter or a
merged model, the tokenizer, and the precision asked for. Generating text is
`cpuft.inference.generate`; scoring is `cpuft.inference.evaluate`.

What `--model` may name (`resolve_source`):
- a cpuft run directory (has config.yaml / summary.json): its adapter/ is used;
- an adapter directory (adapter_config.json: a run's adapter/ or any checkpoint-N/); a `cpuft dpo`
  run started from an SFT run is that run's adapter merged into the base, then its own on top;
- a model directory or Hub id (config.json): a merged model or any stock causal LM.

Adapters: whatever PEFT method adapter_config.json's `peft_type` names, loaded by stock PEFT
(`PeftModel.from_pretrained`); cpuft trains and tests eight of them (`ADAPTER_METHODS`).
The base model of an adapter is the one recorded in adapter_config.json unless `base` is given.
Before an adapter is applied, every module it adapts is checked against the base model (present;
for LoRA and AdaLoRA also the same in/out features), and a prompt-learning adapter (virtual
tokens) runs one token through the model, so an adapter for another base fails with a message,
not a shape trace. The tokenizer comes from the adapter directory (cpuft saves it there) or else
from the base.

Precision: fp32 / bf16 / fp16 weights (`dtype`), `int8=<method>` (a weight adapter - LoRA, LoHa,
LoKr, IA3, AdaLoRA - is merged first, then `cpuft.inference.int8` quantises every linear layer;
prompt/prefix/p-tuning adapters cannot be merged, so only the base model's linear layers are
quantised and the virtual tokens stay in full precision; a method that cannot take the requested
dtype's activations runs in the dtype it can, recorded in `LoadedModel.notes`), or `nf4=True`
(bitsandbytes 4-bit base, adapter on top; the CUDA path, also runs on x86 CPUs). LoHa and LoKr
cannot sit on 4-bit layers (PEFT has no bitsandbytes layer for them): refused with nf4.

Limits: one device per model; adapters with several named sub-adapters load the default one.

Raises UserError (exit 2) for: a run directory without adapter/, a missing adapter or model, an
adapter that does not fit the base or that PEFT cannot load, a missing tokenizer, an unusable
int8 method, LoHa/LoKr with nf4.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cpuft.config.choices import PeftMethod, values
from cpuft.config.peft_config import PROMPT_LEARNING
from cpuft.dtypes import torch_dtype
from cpuft.errors import UserError, first_line
from cpuft.run_dir import RunDir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# adapter_config.json's peft_type -> the `peft_method` of `cpuft sft` that trains it: PEFT's
# PeftType values are cpuft's method names in capitals ("p_tuning" -> "P_TUNING").
ADAPTER_METHODS = {method.upper(): method for method in values(PeftMethod)}
# Virtual-token methods: no weight change to merge, nothing for int8 to quantise but the base.
PROMPT_LEARNING_TYPES = tuple(method.upper() for method in PROMPT_LEARNING)
# Weight-delta methods without a bitsandbytes 4-bit layer in PEFT 0.21 (peft/tuners/{loha,lokr}).
NO_NF4_METHODS = ("LOHA", "LOKR")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights of a fine-tune live, resolved from what the user passed."""

    kind: Literal["adapter", "model"]
    given: str  # what the user passed, for messages
    model: str  # the base model (kind "adapter") or the model itself (kind "model")
    adapter_dir: Path | None = None
    revision: str | None = None  # of `model` on the Hub; an adapter's is recorded in adapter_config.json
    trust_remote_code: bool = False  # run the Python code `model`'s repository ships (--trust-remote-code)
    # A `cpuft dpo` run started from an SFT run: that run's adapter, merged into the base first
    # (the DPO adapter was trained on the SFT model).
    merged_first: Path | None = None

    def pretrained_kwargs(self) -> dict[str, Any]:
        """from_pretrained arguments for `model`: its revision and the remote-code switch."""
        from cpuft.modeling import pretrained_kwargs

        return pretrained_kwargs(self.model, self.revision, self.trust_remote_code)

    @property
    def tokenizer_candidates(self) -> list[str]:
        return ([str(self.adapter_dir)] if self.adapter_dir else []) + [self.model]

    def describe(self) -> str:
        if self.kind == "adapter":
            first = f" + merged adapter {self.merged_first}" if self.merged_first else ""
            return f"{self.model}{first} + adapter {self.adapter_dir}"
        return self.model


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    precision: str  # "fp32", "bf16", "int8 (torch-dynamic, fp32 activations)", "nf4", ...
    notes: list[str] = field(default_factory=list)  # choices that differ from what was asked, and why


# ----------------------------------------------------------------------------- resolving


def is_run_dir(path: Path) -> bool:
    return RunDir(path).looks_like_run()


def resolve_source(
    given: str, base: str | None = None, revision: str | None = None, trust_remote_code: bool = False
) -> ModelSource:
    """Work out what `given` is (run dir, adapter dir, model dir or Hub id) and which base it needs."""
    path = Path(given).expanduser()
    if path.is_dir() and is_run_dir(path) and not (path / ADAPTER_CONFIG).is_file():
        adapter = RunDir(path).adapter_dir
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise UserError(_no_adapter_message(path))
        path = adapter
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        # The base's revision: the one asked for, else the one the adapter was trained on (PEFT
        # records it), unless --base names another model.
        recorded = None if base else _read_adapter_config(path).get("revision")
        return ModelSource("adapter", given, _adapter_base(path, base), adapter_dir=path.resolve(),
                           revision=revision or recorded, trust_remote_code=trust_remote_code,
                           merged_first=None if base else starting_adapter(path))
    if path.is_dir() and (path / "config.json").is_file():
        if base:
            raise UserError(f"{given} is a full model (config.json, no {ADAPTER_CONFIG}); --base is only for adapters.")
        return ModelSource("model", given, str(path.resolve()), trust_remote_code=trust_remote_code)
    if path.is_dir():
        raise UserError(
            f"{given} is neither a cpuft run directory, an adapter directory ({ADAPTER_CONFIG}) nor"
            " a model directory (config.json). Pass the run directory of `cpuft sft`, its adapter/,"
            " or the output of `cpuft merge`."
        )
    if given.startswith((".", "/", "~")) or path.suffix:
        raise UserError(f"model {given} does not exist.")
    # A Hub id; loading says whether it is reachable.
    return ModelSource("model", given, given, revision=revision, trust_remote_code=trust_remote_code)


def starting_adapter(adapter_dir: Path) -> Path | None:
    """The SFT adapter a `cpuft dpo` adapter (its run's adapter/ or a checkpoint-N/) was trained on
    top of: its run's config.yaml names an SFT run directory as `model` (cpuft.train.dpo). None
    for any other adapter."""
    from cpuft.config.yaml_file import read_mapping

    run = RunDir(adapter_dir.resolve().parent)
    if not run.config_file.is_file():
        return None
    try:
        started_from = read_mapping(run.config_file)[0].get("model")
    except UserError:
        return None
    first = RunDir(Path(str(started_from))).adapter_dir if started_from else None
    if first is None or not RunDir(first.parent).config_file.is_file():
        return None  # a base model: a plain adapter
    if not (first / ADAPTER_CONFIG).is_file():
        raise UserError(f"{adapter_dir} was trained on top of the SFT run {first.parent}, whose adapter"
                        f" ({first}) is gone: restore that run, or pass --base with a merged SFT model.")
    return first


def _no_adapter_message(run_dir: Path) -> str:
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if (p / ADAPTER_CONFIG).is_file()),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    summary = RunDir(run_dir).read_summary()
    checkpoint_hint = f", or use its last checkpoint's adapter: --model {checkpoints[-1]}" if checkpoints else ""
    if summary is not None and summary.status == "completed":
        return (
            f"run directory {run_dir} has no {RunDir.ADAPTER}/ although its summary says the run completed:"
            f" the adapter was moved or deleted. Point --model at the adapter's new place{checkpoint_hint}."
        )
    return (
        f"run directory {run_dir} has no {RunDir.ADAPTER}/: the run did not finish. Continue it with"
        f" `cpuft sft --output-dir {run_dir} --resume`{checkpoint_hint}."
    )


def _read_adapter_config(adapter_dir: Path) -> dict:
    path = adapter_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}).") from None
    if not any((adapter_dir / name).is_file() for name in ADAPTER_WEIGHTS):
        raise UserError(f"adapter directory {adapter_dir} has {ADAPTER_CONFIG} but no adapter_model.safetensors.")
    method = config.get("peft_type")
    if not isinstance(method, str) or method.upper() not in _peft_types():
        raise UserError(
            f"{path}: peft_type is {method!r}, which is not a PEFT method; an adapter saved by PEFT"
            f" names one of {', '.join(ADAPTER_METHODS)} (the methods cpuft trains), or another of PEFT's."
        )
    return config


def _peft_types() -> set[str]:
    from peft import PeftType

    return {member.value for member in PeftType}


def adapter_method(adapter_dir: Path) -> str:
    """The adapter's PEFT type as adapter_config.json names it ("LORA", "PREFIX_TUNING", ...)."""
    return _read_adapter_config(adapter_dir)["peft_type"].upper()


def _adapter_base(adapter_dir: Path, base: str | None) -> str:
    config = _read_adapter_config(adapter_dir)
    if base:
        return str(Path(base).expanduser().resolve()) if Path(base).expanduser().is_dir() else base
    recorded = config.get("base_model_name_or_path")
    if not recorded:
        raise UserError(f"{adapter_dir / ADAPTER_CONFIG} does not name its base model; pass --base MODEL.")
    looks_like_path = recorded.startswith(("/", ".", "~")) or Path(recorded).expanduser().exists()
    if looks_like_path and not (Path(recorded).expanduser() / "config.json").is_file():
        raise UserError(
            f"the adapter in {adapter_dir} was trained on {recorded}, which is not there any more;"
            " pass --base with the same base model's directory or Hub id."
        )
    return recorded


# ----------------------------------------------------------------------------- loading


def load_for_inference(
    source: ModelSource,
    dtype: str = "fp32",
    device: str = "cpu",
    int8: str | None = None,
    nf4: bool = False,
    merge: bool = False,
) -> LoadedModel:
    """Load tokenizer and model for `source`, checked and ready for generating and scoring.

    `merge=True` folds the adapter into the base weights (faster per token, no PEFT at run time);
    int8 implies it.
    """

    if int8 and nf4:
        raise UserError("--int8 and --nf4 are two different quantisations; choose one.")
    if int8 and device != "cpu":
        raise UserError("--int8 is the CPU inference path; on CUDA use --nf4.")
    method = adapter_method(source.adapter_dir) if source.kind == "adapter" else None
    if nf4 and method in NO_NF4_METHODS:
        raise UserError(
            f"the adapter in {source.adapter_dir} is {ADAPTER_METHODS[method]}, which PEFT cannot put on"
            " 4-bit (--nf4) layers; load the base in fp32/bf16 (drop --nf4), or use --int8 on CPU."
        )
    notes = []
    if int8:
        from cpuft.inference.int8 import int8_model_dtype

        dtype, why = int8_model_dtype(int8, dtype)
        if why:
            notes.append(why)
    tokenizer = load_tokenizer(source)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype)}
    if nf4:
        from cpuft.modeling import bitsandbytes_config

        kwargs["quantization_config"] = bitsandbytes_config("nf4", dtype)
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    if int8:
        # Read weights into memory: mapped checkpoint pages would stay resident (and counted in
        # RSS) after quantisation drops the float weights they back.
        kwargs["disable_mmap"] = True
    model = _load_model_weights(source.model, kwargs, what="base model" if source.kind == "adapter" else "model",
                                hub=source.pretrained_kwargs())
    if device == "cuda" and not nf4:
        model = model.to("cuda")
    unmerged_adapter = False
    if source.kind == "adapter":
        grow_embeddings_to_tokenizer(model, tokenizer)
        if source.merged_first is not None:  # the SFT model the DPO adapter was trained on
            check_adapter_fits(source.merged_first, model)
            model = apply_adapter(model, source.merged_first).merge_and_unload()
        check_adapter_fits(source.adapter_dir, model)
        model = apply_adapter(model, source.adapter_dir)
        if model.active_peft_config.is_prompt_learning:
            check_prompt_learning_fits(source.adapter_dir, model)
        unmerged_adapter = True
        if merge or int8:
            if model.active_peft_config.is_prompt_learning:
                notes.append(
                    f"{ADAPTER_METHODS.get(method, method.lower())} adapter kept unmerged: its virtual tokens"
                    " are not a weight change" + (" (only the base model's linear layers are int8)" if int8 else "")
                )
            elif nf4:
                notes.append("adapter kept unmerged: merging into 4-bit weights would round it away")
            else:
                model = model.merge_and_unload()
                unmerged_adapter = False
    model.eval()
    precision = "nf4" if nf4 else dtype
    if int8:
        from cpuft.inference.int8 import quantize_for_cpu_inference

        # Under a kept (prompt-learning) adapter only the base is quantised: the prompt encoder
        # is a few small layers, and int8 rounding of the virtual tokens would buy nothing.
        quantize_for_cpu_inference(model.get_base_model() if unmerged_adapter else model, int8)
        precision = f"int8 ({int8}, {dtype} activations)"
    return LoadedModel(model, tokenizer, source, precision, notes)


def apply_adapter(model, adapter_dir: Path, adapter_name: str = "default"):
    """`PeftModel.from_pretrained` (any PEFT method, by adapter_config.json's peft_type), with
    PEFT's own refusals (unknown target modules, size mismatches) as a UserError."""
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter_dir), adapter_name=adapter_name)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        base_name = getattr(model.config, "_name_or_path", "the base model")
        raise UserError(
            f"PEFT cannot load the adapter in {adapter_dir} onto {base_name}: {first_line(exc)}."
            " If it was trained on another base model, pass --base with that model."
        ) from None


def _load_model_weights(name: str, kwargs: dict, what: str, hub: dict | None = None):
    from transformers import AutoConfig

    from cpuft.planning.architecture import auto_model_class

    try:
        # AutoModelForSeq2SeqLM for encoder-decoders (T5, mT5), AutoModelForCausalLM otherwise.
        hub = hub or {}
        return auto_model_class(AutoConfig.from_pretrained(name, **hub)).from_pretrained(name, **hub, **kwargs)
    except Exception as exc:  # OSError for missing files, ValueError for bad configs, hub errors
        from cpuft.modeling import loading_error

        raise loading_error(name, exc, f"cannot load the {what} '{name}': {first_line(exc)}") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    for candidate in source.tokenizer_candidates:
        if _has_tokenizer_files(candidate):
            # A local directory has no revisions; its code may still need the switch.
            tokenizer = AutoTokenizer.from_pretrained(candidate, trust_remote_code=source.trust_remote_code)
            break
    else:
        if source.kind == "model" and not Path(source.model).is_dir():
            try:  # a Hub id: let transformers find (or fail to find) it
                tokenizer = AutoTokenizer.from_pretrained(source.model, **source.pretrained_kwargs())
            except Exception as exc:
                raise UserError(f"cannot load the tokenizer of '{source.model}': {exc}") from None
        else:
            places = " nor ".join(source.tokenizer_candidates)
            raise UserError(
                f"no tokenizer found in {places}. Copy the base model's tokenizer files"
                " (tokenizer.json, tokenizer_config.json, special_tokens_map.json) into"
                f" {source.tokenizer_candidates[0]}."
            )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _has_tokenizer_files(candidate: str) -> bool:
    path = Path(candidate)
    if not path.is_dir():
        return False
    return any((path / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model"))


def grow_embeddings_to_tokenizer(model, tokenizer) -> None:
    """Make room for tokens training added (cpuft's default chat template); the adapter holds their rows."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)


def check_adapter_fits(adapter_dir: Path, base_model) -> None:
    """Raise UserError unless every module `adapter_dir` adapts is a module of `base_model`, and
    every LoRA/AdaLoRA matrix has that module's in/out features.

    Reads only the safetensors header (shapes), so a mismatch costs no weight loading. Weights
    of other methods (LoHa/LoKr factors, IA3 vectors) are checked by PEFT when it loads them
    (`apply_adapter`); prompt-learning adapters adapt no module (`check_prompt_learning_fits`).
    """
    from peft import PeftType
    from peft.mapping import PEFT_TYPE_TO_PREFIX_MAPPING
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a .bin adapter: PEFT's own error will have to do
    # The first key component naming the method's own parameters ("lora_A", "hada_w1_a", "ia3_l"):
    # what comes before it is the adapted module's path.
    method = adapter_method(adapter_dir)
    prefix = PEFT_TYPE_TO_PREFIX_MAPPING.get(PeftType(method))
    if prefix is None or method in PROMPT_LEARNING_TYPES:
        return
    base_name = getattr(base_model.config, "_name_or_path", "the base model")
    modules = dict(base_model.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            parts = key.split(".")
            at = next((i for i, part in enumerate(parts) if part.startswith(prefix)), None)
            if at is None:
                continue  # modules_to_save copies, trainable token rows: PEFT checks those
            module_path = ".".join(parts[:at]).removeprefix("base_model.model.")
            shape = f.get_slice(key).get_shape()
            module = modules.get(module_path)
            if module is None:
                raise UserError(
                    f"the adapter in {adapter_dir} does not fit {base_name}: it adapts"
                    f" '{module_path}', which that model does not have. It was trained on another"
                    " base model; pass --base with the model it was trained on."
                )
            if parts[at] not in ("lora_A", "lora_B"):
                continue
            # lora_A is (r, in_features), lora_B is (out_features, r), in LoRA and AdaLoRA alike.
            side, want, got = (
                ("input", getattr(module, "in_features", None), shape[1]) if parts[at] == "lora_A"
                else ("output", getattr(module, "out_features", None), shape[0])
            )
            if want is not None and want != got:
                raise UserError(
                    f"the adapter in {adapter_dir} does not fit {base_name}: '{module_path}' has"
                    f" {want} {side} features but the adapter expects {got}. It was trained on"
                    " another base model; pass --base with the model it was trained on."
                )


def check_prompt_learning_fits(adapter_dir: Path, model) -> None:
    """Raise UserError unless a prompt/prefix/p-tuning adapter's virtual tokens fit the model.

    PEFT builds their encoder from the adapter's own config (token_dim, num_layers), so a
    mismatch with the base shows only when a token runs through; one token does that cheaply.
    """
    import torch

    ids = torch.zeros((1, 1), dtype=torch.long, device=device_of(model))
    try:
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    except (RuntimeError, ValueError, IndexError) as exc:
        base_name = getattr(model.get_base_model().config, "_name_or_path", "the base model")
        raise UserError(
            f"the adapter in {adapter_dir} does not fit {base_name}: its virtual tokens do not match"
            f" the model ({first_line(exc)}). It was trained on another base model; pass --base with"
            " the model it was trained on."
        ) from None


def device_of(model) -> str:
    """Where the model's weights are ("cpu", "cuda:0"): inputs must be moved there."""
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "cpu"
