"""Load a fine-tune for answering: base + LoRA adapter, or a merged model; generate, stream, score.

What `--model` may name (`resolve_source`):
- a cpuft run directory (has config.yaml / summary.json): its adapter/ is used;
- an adapter directory (adapter_config.json: a run's adapter/ or any checkpoint-N/);
- a model directory or Hub id (config.json): a merged model or any stock causal LM.

The base model of an adapter is the one recorded in adapter_config.json unless `base` is given.
Before an adapter is applied, every module it targets is checked against the base model (present,
same in/out features), so an adapter for another base fails with a message, not a shape trace.
The tokenizer comes from the adapter directory (cpuft saves it there) or else from the base.

Precision: fp32 / bf16 weights (`dtype`), `int8=<method>` (the adapter is merged first, then
`cpuft.int8` quantises every linear layer), or `nf4=True` (bitsandbytes 4-bit base, adapter on
top; the CUDA path, also runs on x86 CPUs).

Raises UserError (exit 2) for: a run directory without adapter/, a missing adapter or model, an
adapter that does not fit the base, a missing tokenizer, an unusable int8 method.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cpuft.errors import UserError

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class ModelSource:
    """Where the weights of a fine-tune live, resolved from what the user passed."""

    kind: Literal["adapter", "model"]
    given: str  # what the user passed, for messages
    model: str  # the base model (kind "adapter") or the model itself (kind "model")
    adapter_dir: Path | None = None

    @property
    def tokenizer_candidates(self) -> list[str]:
        return ([str(self.adapter_dir)] if self.adapter_dir else []) + [self.model]

    def describe(self) -> str:
        if self.kind == "adapter":
            return f"{self.model} + adapter {self.adapter_dir}"
        return self.model


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    precision: str  # "fp32", "bf16", "int8 (torch-dynamic)", "nf4", ...
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- resolving


def is_run_dir(path: Path) -> bool:
    return any((path / name).is_file() for name in ("config.yaml", "summary.json", "plan.json"))


def resolve_source(given: str, base: str | None = None) -> ModelSource:
    """Work out what `given` is (run dir, adapter dir, model dir or Hub id) and which base it needs."""
    path = Path(given).expanduser()
    if path.is_dir() and is_run_dir(path) and not (path / ADAPTER_CONFIG).is_file():
        adapter = path / "adapter"
        if not (adapter / ADAPTER_CONFIG).is_file():
            raise UserError(_no_adapter_message(path))
        path = adapter
    if path.is_dir() and (path / ADAPTER_CONFIG).is_file():
        return ModelSource("adapter", given, _adapter_base(path, base), adapter_dir=path.resolve())
    if path.is_dir() and (path / "config.json").is_file():
        if base:
            raise UserError(f"{given} is a full model (config.json, no {ADAPTER_CONFIG}); --base is only for adapters.")
        return ModelSource("model", given, str(path.resolve()))
    if path.is_dir():
        raise UserError(
            f"{given} is neither a cpuft run directory, an adapter directory ({ADAPTER_CONFIG}) nor"
            " a model directory (config.json). Pass the run directory of `cpuft sft`, its adapter/,"
            " or the output of `cpuft merge`."
        )
    if given.startswith((".", "/", "~")) or path.suffix:
        raise UserError(f"model {given} does not exist.")
    return ModelSource("model", given, given)  # a Hub id; loading says whether it is reachable


def _no_adapter_message(run_dir: Path) -> str:
    checkpoints = sorted(
        (p for p in run_dir.glob("checkpoint-*") if (p / ADAPTER_CONFIG).is_file()),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    status = None
    summary = run_dir / "summary.json"
    if summary.is_file():
        try:
            status = json.loads(summary.read_text()).get("status")
        except (json.JSONDecodeError, OSError):
            pass
    checkpoint_hint = f", or use its last checkpoint's adapter: --model {checkpoints[-1]}" if checkpoints else ""
    if status == "completed":
        return (
            f"run directory {run_dir} has no adapter/ although its summary says the run completed:"
            f" the adapter was moved or deleted. Point --model at the adapter's new place{checkpoint_hint}."
        )
    return (
        f"run directory {run_dir} has no adapter/: the run did not finish. Continue it with"
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
    if config.get("peft_type") != "LORA":
        raise UserError(f"{path}: peft_type is {config.get('peft_type')!r}; cpuft loads LoRA adapters only.")
    return config


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
    """Load tokenizer and model for `source`, checked and ready for `generate`/`evaluate_loss`.

    `merge=True` folds the adapter into the base weights (faster per token, no PEFT at run time);
    int8 implies it.
    """
    import torch

    if int8 and nf4:
        raise UserError("--int8 and --nf4 are two different quantisations; choose one.")
    if int8 and device != "cpu":
        raise UserError("--int8 is the CPU inference path; on CUDA use --nf4.")
    tokenizer = load_tokenizer(source)
    kwargs: dict[str, Any] = {"dtype": getattr(torch, TORCH_DTYPES[dtype])}
    if nf4:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=kwargs["dtype"] if dtype != "fp32" else torch.float32,
        )
        kwargs["device_map"] = {"": 0} if device == "cuda" else {"": "cpu"}
    if int8:
        # Read weights into memory: mapped checkpoint pages would stay resident (and counted in
        # RSS) after quantisation drops the float weights they back.
        kwargs["disable_mmap"] = True
    model = _load_model_weights(source.model, kwargs, what="base model" if source.kind == "adapter" else "model")
    if device == "cuda" and not nf4:
        model = model.to("cuda")
    notes = []
    if source.kind == "adapter":
        check_adapter_fits(source.adapter_dir, model)
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(source.adapter_dir))
        if merge or int8:
            if nf4:
                notes.append("adapter kept unmerged: merging into 4-bit weights would round it away")
            else:
                model = model.merge_and_unload()
    model.eval()
    precision = "nf4" if nf4 else dtype
    if int8:
        from cpuft.int8 import quantize_for_cpu_inference

        quantize_for_cpu_inference(model, int8)
        precision = f"int8 ({int8})"
    return LoadedModel(model, tokenizer, source, precision, notes)


def _load_model_weights(name: str, kwargs: dict, what: str):
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs)
    except Exception as exc:  # OSError for missing files, ValueError for bad configs, hub errors
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot load the {what} '{name}': {first_line}") from None


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    for candidate in source.tokenizer_candidates:
        if _has_tokenizer_files(candidate):
            tokenizer = AutoTokenizer.from_pretrained(candidate)
            break
    else:
        if source.kind == "model" and not Path(source.model).is_dir():
            try:  # a Hub id: let transformers find (or fail to find) it
                tokenizer = AutoTokenizer.from_pretrained(source.model)
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


def check_adapter_fits(adapter_dir: Path, base_model) -> None:
    """Raise UserError unless every LoRA matrix in `adapter_dir` fits a module of `base_model`.

    Reads only the safetensors header (shapes), so a mismatch costs no weight loading.
    """
    from safetensors import safe_open

    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        return  # a .bin adapter: PEFT's own error will have to do
    base_name = getattr(base_model.config, "_name_or_path", "the base model")
    modules = dict(base_model.named_modules())
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module_path = key.split(".lora_")[0].removeprefix("base_model.model.")
            shape = f.get_slice(key).get_shape()
            module = modules.get(module_path)
            if module is None:
                raise UserError(
                    f"the adapter in {adapter_dir} does not fit {base_name}: it adapts"
                    f" '{module_path}', which that model does not have. It was trained on another"
                    " base model; pass --base with the model it was trained on."
                )
            # lora_A is (r, in_features), lora_B is (out_features, r).
            side, want, got = (
                ("input", getattr(module, "in_features", None), shape[1]) if ".lora_A." in key
                else ("output", getattr(module, "out_features", None), shape[0])
            )
            if want is not None and want != got:
                raise UserError(
                    f"the adapter in {adapter_dir} does not fit {base_name}: '{module_path}' has"
                    f" {want} {side} features but the adapter expects {got}. It was trained on"
                    " another base model; pass --base with the model it was trained on."
                )


# ----------------------------------------------------------------------------- generating


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0

    def generate_kwargs(self, tokenizer) -> dict:
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": tokenizer.pad_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        return kwargs


def prompt_ids(tokenizer, messages: list[dict] | None = None, text: str | None = None, device: str = "cpu"):
    """Token ids for a chat (via the chat template, with the assistant turn opened) or raw text."""
    if messages is not None:
        if not tokenizer.chat_template:
            raise UserError(
                "the tokenizer has no chat template, so a chat cannot be formatted. Use --raw to"
                " continue plain text, or a chat/instruct model."
            )
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    else:
        ids = tokenizer(text, return_tensors="pt")
    return {k: v.to(device) for k, v in ids.items() if k in ("input_ids", "attention_mask")}


def generate(loaded: LoadedModel, settings: GenerationSettings, messages=None, text=None) -> str:
    """The model's continuation (new tokens only, special tokens stripped)."""
    import torch

    inputs = prompt_ids(loaded.tokenizer, messages, text, device=_device_of(loaded.model))
    torch.manual_seed(settings.seed)
    with torch.inference_mode():
        output = loaded.model.generate(**inputs, **settings.generate_kwargs(loaded.tokenizer))
    new_tokens = output[0, inputs["input_ids"].shape[1]:]
    return loaded.tokenizer.decode(new_tokens, skip_special_tokens=True)


def stream(loaded: LoadedModel, settings: GenerationSettings, messages=None, text=None) -> Iterator[str]:
    """Yield text pieces as they are generated (generation runs in a background thread)."""
    import torch
    from transformers import TextIteratorStreamer

    inputs = prompt_ids(loaded.tokenizer, messages, text, device=_device_of(loaded.model))
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    failure: list[BaseException] = []

    def run() -> None:
        torch.manual_seed(settings.seed)
        try:
            with torch.inference_mode():
                loaded.model.generate(**inputs, **settings.generate_kwargs(loaded.tokenizer), streamer=streamer)
        except BaseException as exc:  # re-raised in the caller's thread below
            failure.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield from streamer
    thread.join()
    if failure:
        raise failure[0]


def _device_of(model) -> str:
    try:
        return str(next(model.parameters()).device)
    except StopIteration:
        return "cpu"


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class LossResult:
    loss: float  # mean next-token cross-entropy per scored token (nats)
    perplexity: float
    tokens: int  # tokens scored
    rows: int


def evaluate_loss(loaded: LoadedModel, rows, max_length: int = 512, batch_size: int = 4,
                  assistant_only: bool = False, progress=None) -> LossResult:
    """Token-weighted mean loss and perplexity over conversational ({"messages"}) or {"text"} rows.

    Tokenised the way TRL's SFTTrainer does (chat template, no extra special tokens, truncated to
    `max_length`), so with all tokens scored it matches the trainer's eval loss on the same rows.
    `assistant_only` scores the assistant turns alone (needs `{% generation %}` in the template).
    """
    import torch

    tokenizer, model = loaded.tokenizer, loaded.model
    sequences = [_tokenize_row(tokenizer, row, assistant_only, max_length) for row in rows]
    total_loss, total_tokens = 0.0, 0
    device = _device_of(model)
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, (ids, scored) in enumerate(batch):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            attention[i, :len(ids)] = 1
            labels[i, :len(ids)] = torch.tensor([t if keep else -100 for t, keep in zip(ids, scored)])
        with torch.inference_mode():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        shifted = labels[:, 1:].to(device)
        loss_sum = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), shifted.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total_loss += loss_sum.item()
        total_tokens += int((shifted != -100).sum())
        if progress is not None:
            progress(len(batch))
    if total_tokens == 0:
        raise UserError("no tokens to score: every row is empty after tokenisation (or has no assistant turn).")
    mean = total_loss / total_tokens
    return LossResult(mean, math.exp(mean), total_tokens, len(sequences))


def _tokenize_row(tokenizer, row: dict, assistant_only: bool, max_length: int) -> tuple[list[int], list[bool]]:
    if "messages" in row:
        out = tokenizer.apply_chat_template(
            row["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=assistant_only
        )
        ids = list(out["input_ids"])
        scored = [bool(m) for m in out["assistant_masks"]] if assistant_only else [True] * len(ids)
    else:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        scored = [True] * len(ids)
    return ids[:max_length], scored[:max_length]


def split_prompt_reference(messages: list[dict]) -> tuple[list[dict], str]:
    """A conversation -> (everything before the last assistant turn, that turn's text)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]
