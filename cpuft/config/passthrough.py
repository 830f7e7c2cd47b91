"""TRL's `SFTConfig` and the PEFT config of the chosen `peft_method`, passed through.

Every field of those dataclasses is also a cpuft config key and flag (`max_grad_norm: 0.5`,
`--use-dora true`), typed by the dataclass's own annotations (cpuft.config.values) and validated
by building the dataclass itself (`validate_library_configs`), so a value the library would
refuse stops the job before anything is written or loaded.

Owns, each once:
- `TRL_DEVIATIONS`, `PEFT_DEVIATIONS`: cpuft's values for library fields where they differ from
  the library's default, and why. `cpuft sft --help-trl` / `--help-peft` print them, and the
  builders here (and `SFTJobConfig`'s defaults) read them.
- Which fields cpuft sets itself (`set_by`): the hardware plan's (bf16, use_cpu, batch sizes,
  activation checkpointing, ...) and the ones cpuft's own pipeline owns. Setting one of those
  directly is refused with the cpuft key to use, so the plan is never contradicted in silence.
- The builders of the keyword arguments: `sft_config_kwargs` (all but the plan's fields; the
  run adds those in cpuft.train.trainer_args) and `peft_config_kwargs`.

The flat namespace is cpuft's own keys first (cpuft.config.job), then SFTConfig's fields, then
the PEFT config's. PEFT fields are typed once `peft_method` is known (the same name can have
different types in two PEFT configs).

Limits: TRL and PEFT are imported on first use (several seconds), not when cpuft starts. AdaLoRA's
schedule is validated against `max_steps` when it is set and against a placeholder length
otherwise (the real length needs the data).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import enum
import functools
import math
import re
import typing
import warnings
from dataclasses import dataclass
from typing import Any

from cpuft.config.values import typed_value
from cpuft.errors import UserError, first_line

# The PEFT config class of each `peft_method` (cpuft.config.choices.PeftMethod).
PEFT_CONFIG_CLASSES = {
    "lora": "LoraConfig",
    "loha": "LoHaConfig",
    "lokr": "LoKrConfig",
    "ia3": "IA3Config",
    "adalora": "AdaLoraConfig",
    "prompt_tuning": "PromptTuningConfig",
    "prefix_tuning": "PrefixTuningConfig",
    "p_tuning": "PromptEncoderConfig",
}
LORA_LIKE = ("lora", "loha", "lokr", "adalora")
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning", "p_tuning")


class _RunTime:
    """A value only known at run time (the plan's choice, the run's length)."""

    def __repr__(self) -> str:
        return "AT_RUN_TIME"


AT_RUN_TIME = _RunTime()


@dataclass(frozen=True)
class Deviation:
    """cpuft's value for a library field, and why.

    `set_by` names the cpuft key (or flag) through which the field is set; setting the field
    itself is then refused. None: the field is set under its own name (a cpuft key of the same
    name, or a pass-through key). `shown` replaces `value` in --help when the value is computed.
    """

    value: Any
    why: str
    set_by: str | None = None
    shown: str | None = None

    def display(self) -> str:
        return self.shown if self.shown is not None else short_value(self.value)


# ----------------------------------------------------------------------------- deviations

TRL_DEVIATIONS: dict[str, Deviation] = {
    # cpuft keys of the same name, with cpuft's defaults (SFTJobConfig reads these)
    "learning_rate": Deviation(2e-4, "LoRA trains few weights and tolerates ~10x a full fine-tune's rate"),
    "lr_scheduler_type": Deviation("cosine", "decays to zero by the last step"),
    "warmup_steps": Deviation(0.03, "a float < 1 is a fraction of the run: 3 % warm-up"),
    "num_train_epochs": Deviation(1.0, "one pass keeps a first run on a CPU short"),
    "max_length": Deviation(512, "CPU time and activation memory grow with length"),
    "logging_steps": Deviation(1, "metrics.jsonl and the progress bar show every step"),
    "save_steps": Deviation(50, "resume and preemption lose at most 50 steps"),
    "save_total_limit": Deviation(2, "keeps disk use bounded; TRL keeps every checkpoint"),
    "output_dir": Deviation(AT_RUN_TIME, "one directory per run", shown="runs/sft-<timestamp>"),
    "packing": Deviation(AT_RUN_TIME, "as asked, once the plan has checked that samples stay apart", shown="the plan"),
    # cpuft's values for fields without a cpuft key; set the field to override
    "report_to": Deviation(
        "tensorboard", "event files in the run's tensorboard/; wandb, mlflow and trackio log locally when offline"
    ),
    "eval_strategy": Deviation(AT_RUN_TIME, "evaluations every eval_steps", None, "'steps' with eval_steps"),
    "load_best_model_at_end": Deviation(
        AT_RUN_TIME, "adapter/ is the checkpoint with the lowest eval_loss", None, "true with eval_steps"
    ),
    "metric_for_best_model": Deviation(AT_RUN_TIME, "the best checkpoint is the one with the lowest eval loss",
                                       None, "'eval_loss' with eval_steps"),
    "greater_is_better": Deviation(AT_RUN_TIME, "a lower eval loss is better", None, "false with eval_steps"),
    "save_strategy": Deviation("steps", "checkpoints every save_steps are what --resume and preemption use"),
    "data_seed": Deviation(AT_RUN_TIME, "one seed for the split, the order and accelerate's sampler", shown="seed"),
    # the hardware plan decides these (`cpuft env` shows why); set them through the cpuft key
    "bf16": Deviation(AT_RUN_TIME, "TRL turns it on unless fp16; the plan only where the CPU has AMX/AVX512-BF16 or the GPU bf16", "dtype", "the plan"),
    "fp16": Deviation(AT_RUN_TIME, "the plan's compute dtype", "dtype", "the plan"),
    "bf16_full_eval": Deviation(False, "evaluation runs in the plan's compute dtype", "dtype"),
    "fp16_full_eval": Deviation(False, "evaluation runs in the plan's compute dtype", "dtype"),
    "use_cpu": Deviation(AT_RUN_TIME, "the plan's device", "device", "the plan"),
    "dataloader_pin_memory": Deviation(AT_RUN_TIME, "pinned memory only helps copies to a GPU", "device", "on CUDA only"),
    "gradient_checkpointing": Deviation(
        AT_RUN_TIME, "off unless the memory plan needs it: recompute costs ~1.5x time on a CPU",
        "gradient_checkpointing", "the plan",
    ),
    "activation_checkpointing": Deviation(
        AT_RUN_TIME, "transformers 5's name for gradient_checkpointing", "gradient_checkpointing", "the plan",
    ),
    "per_device_train_batch_size": Deviation(AT_RUN_TIME, "sized by the memory plan", "per_device_batch_size", "the plan"),
    "per_device_eval_batch_size": Deviation(AT_RUN_TIME, "the training micro-batch", "per_device_batch_size", "the plan"),
    "auto_find_batch_size": Deviation(False, "the memory plan sizes the batch before loading", "per_device_batch_size"),
    "gradient_accumulation_steps": Deviation(
        AT_RUN_TIME, "the plan's effective batch", "gradient_accumulation_steps", "the plan"
    ),
    "optim": Deviation(
        AT_RUN_TIME, "the memory plan counts its state: adamw_torch_fused on CPU, paged_adamw_8bit for QLoRA on CUDA, else adamw_torch",
        "optimizer", "the plan",
    ),
    "torch_compile": Deviation(AT_RUN_TIME, "only runs of 5000+ steps repay inductor's warm-up", "torch_compile", "the plan"),
    "train_sampling_strategy": Deviation(
        AT_RUN_TIME, "rows come in cpuft's length-grouped order (cpuft.data.packing), or packed", "packing",
        "sequential when length-grouped",
    ),
    "padding_free": Deviation(False, "packing is TRL's padding-free bfd path", "packing"),
    "packing_strategy": Deviation("bfd", "bfd keeps samples apart (position_ids restart per sample)", "packing"),
    # cpuft's own pipeline does these
    "disable_tqdm": Deviation(True, "cpuft draws its own progress bar, with tokens/s", "--no-progress"),
    "resume_from_checkpoint": Deviation(AT_RUN_TIME, "the run directory's last checkpoint", "--resume", "with --resume"),
    "dataset_text_field": Deviation("text", "cpuft converts every row format itself", "dataset_format"),
    "assistant_only_loss": Deviation(
        False, "cpuft builds the assistant-token mask itself for any chat template and hands TRL"
        " pre-tokenised rows (TRL's own needs {% generation %} markers); the retired cpuft key of"
        " this name is read as loss_on", "loss_on",
    ),
    "completion_only_loss": Deviation(
        None, "prompt/completion (and alpaca) rows reach TRL as user/assistant conversations that"
        " cpuft masks itself: loss_on assistant trains the completion; plain text rows train on"
        " every token", "loss_on",
    ),
    "model_init_kwargs": Deviation(
        None, "cpuft loads the model itself", "model, revision, trust_remote_code, dtype, quant, attn_implementation"
    ),
}

PEFT_DEVIATIONS: dict[str, Deviation] = {
    "r": Deviation(16, "a common rank for instruction tuning on every linear layer; the adapter stays a few MB", "lora_r"),
    "lora_alpha": Deviation(32, "scale alpha / r = 2"),
    "alpha": Deviation(AT_RUN_TIME, "LoHa/LoKr's alpha is cpuft's lora_alpha", "lora_alpha", "lora_alpha"),
    "lora_dropout": Deviation(0.05, "a little regularisation for small data sets"),
    "target_modules": Deviation(
        "all-linear", "every linear layer but the output head ('all-linear'; ia3: PEFT's per-architecture"
        " default)", "lora_target_modules",
    ),
    "feedforward_modules": Deviation(
        AT_RUN_TIME, "ia3 with explicit lora_target_modules scales their inputs, none as feed-forward", None,
        "[] with explicit lora_target_modules",
    ),
    "num_virtual_tokens": Deviation(20, "PEFT has no default"),
    "target_r": Deviation(AT_RUN_TIME, "AdaLoRA prunes down to lora_r", "lora_r", "lora_r"),
    "init_r": Deviation(AT_RUN_TIME, "AdaLoRA starts from 1.5 x lora_r", "lora_r", "ceil(1.5 x lora_r)"),
    "total_step": Deviation(AT_RUN_TIME, "AdaLoRA lays its schedule over the run", "max_steps", "the run's steps"),
    "tinit": Deviation(AT_RUN_TIME, "AdaLoRA warm-up: the first 10 % of the run", None, "10 % of the run"),
    "tfinal": Deviation(AT_RUN_TIME, "AdaLoRA keeps the ranks fixed for the last 20 %", None, "20 % of the run"),
    "deltaT": Deviation(AT_RUN_TIME, "AdaLoRA reallocates every ~5 % of the run", None, "5 % of the run"),
    # CAUSAL_LM is the placeholder validation builds with; the run sets the model's own (peft_methods).
    "task_type": Deviation(
        "CAUSAL_LM", "the model's: SEQ_2_SEQ_LM for encoder-decoders (T5, mT5), CAUSAL_LM otherwise",
        "(fixed)", "from the model",
    ),
    "peft_type": Deviation(AT_RUN_TIME, "follows the method", "peft_method", "peft_method"),
    "base_model_name_or_path": Deviation(AT_RUN_TIME, "the model cpuft loads", "model", "model"),
    "revision": Deviation(
        AT_RUN_TIME, "the base model's revision, recorded so stock PEFT loads the same base", "revision", "revision"
    ),
    "inference_mode": Deviation(False, "cpuft trains the adapter", "(fixed)"),
    "auto_mapping": Deviation(None, "PEFT writes it when it saves", "(fixed)"),
    "peft_version": Deviation(None, "PEFT writes it when it saves", "(fixed)"),
}


# ----------------------------------------------------------------------------- the fields


@dataclass(frozen=True)
class LibraryField:
    name: str
    hint: Any
    default: Any  # dataclasses.MISSING when the library has none
    help: str
    owner: str  # the dataclass's name


def sft_config_class():
    from trl import SFTConfig

    return SFTConfig


def peft_config_class(method: str):
    import peft

    return getattr(peft, PEFT_CONFIG_CLASSES[method])


@functools.cache
def fields_of(cls) -> dict[str, LibraryField]:
    """The init fields of a library dataclass, with their resolved annotations and help."""
    hints = typing.get_type_hints(cls)
    found = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        text = re.sub(r"<[^>]+>", "", f.metadata.get("help", "")).replace("%%", "%")
        found[f.name] = LibraryField(f.name, hints[f.name], default, " ".join(text.split()), cls.__name__)
    return found


def sft_fields() -> dict[str, LibraryField]:
    return fields_of(sft_config_class())


def peft_fields(method: str) -> dict[str, LibraryField]:
    return fields_of(peft_config_class(method))


def methods_with_field(name: str) -> list[str]:
    return [m for m in PEFT_CONFIG_CLASSES if name in peft_fields(m)]


def library_names() -> list[str]:
    """Every SFTConfig and PEFT config field name (for nearest-name suggestions)."""
    names = dict.fromkeys(sft_fields())
    for method in PEFT_CONFIG_CLASSES:
        names.update(dict.fromkeys(peft_fields(method)))
    return list(names)


def is_library_key(name: str) -> bool:
    return name in sft_fields() or bool(methods_with_field(name))


def nearest_name(name: str, candidates, cutoff: float = 0.5) -> str | None:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return close[0] if close else None


# ----------------------------------------------------------------------------- typing values


def set_by_cpuft_message(name: str, where: str) -> str | None:
    """The refusal for a library field cpuft sets itself (None when the field may be set)."""
    deviation = TRL_DEVIATIONS.get(name) if name in sft_fields() else PEFT_DEVIATIONS.get(name)
    if deviation is None or deviation.set_by in (None, name):
        return None
    owner = "TRL's SFTConfig" if name in sft_fields() else "the PEFT config"
    if deviation.set_by == "(fixed)":
        return f"{where}: '{name}' ({owner}) is fixed by cpuft: {deviation.why}."
    use = deviation.set_by if deviation.set_by.startswith("--") else f"'{deviation.set_by}'"
    return f"{where}: '{name}' ({owner}) is set by cpuft ({deviation.why}); use {use} instead."


def typed_trl_value(name: str, value: Any, where: str) -> Any:
    field = sft_fields()[name]
    return typed_value(name, field.hint, value, where, default=field.default, keep_none_text=True)


def typed_peft_values(method: str, values: dict[str, Any], origins: dict[str, str]) -> dict[str, Any]:
    """PEFT pass-through values typed by `method`'s config class; UserError for a field it lacks."""
    fields = peft_fields(method)
    typed = {}
    for name, value in values.items():
        where = origins.get(name, f"'{name}'")
        if name not in fields:
            owners = ", ".join(PEFT_CONFIG_CLASSES[m] for m in methods_with_field(name))
            raise UserError(
                f"{where}: '{name}' is not a field of {PEFT_CONFIG_CLASSES[method]} (peft_method {method});"
                f" it belongs to {owners}. `cpuft sft --help-peft {method}` lists the fields."
            )
        field = fields[name]
        typed[name] = typed_value(name, field.hint, value, where, default=field.default, keep_none_text=True)
    return typed


# ----------------------------------------------------------------------------- builders


def sft_config_kwargs(config) -> tuple[dict[str, Any], dict[str, str]]:
    """SFTConfig keyword arguments for the job `config`, without the plan's fields.

    Returns (kwargs, source): `source[field]` is the config key a field's value came from.
    """
    fields = sft_fields()
    kwargs: dict[str, Any] = {}
    source: dict[str, str] = {}
    for name in _direct_trl_keys(config):
        kwargs[name], source[name] = getattr(config, name), name
    for name, deviation in TRL_DEVIATIONS.items():  # cpuft's fixed values; the run adds AT_RUN_TIME ones
        if name not in kwargs and deviation.value is not AT_RUN_TIME:
            kwargs[name] = _copy(deviation.value)
    kwargs["data_seed"], source["data_seed"] = config.seed, "seed"
    # transformers reads a text report_to as one integration's name: the comma list as a list.
    kwargs["report_to"] = report_integration_names(config.report_to)
    if config.eval_steps is not None:
        kwargs.update(eval_strategy="steps", load_best_model_at_end=True, metric_for_best_model="eval_loss",
                      greater_is_better=False)
        for name in ("eval_strategy", "load_best_model_at_end", "metric_for_best_model", "greater_is_better"):
            source[name] = "eval_steps"
    for name, value in config.trl_args.items():
        if name in fields:
            kwargs[name], source[name] = _library_value(fields[name].hint, value), name
    return kwargs, source


def _direct_trl_keys(config) -> list[str]:
    """cpuft keys passed to the SFTConfig field of the same name as they are (`trl=True` in
    cpuft.config.job); the plan's keys reach SFTConfig through cpuft.train.trainer_args."""
    return [f.name for f in dataclasses.fields(config) if f.metadata.get("trl")]


def peft_config_kwargs(config, total_steps: int) -> tuple[dict[str, Any], dict[str, str]]:
    """Keyword arguments of the PEFT config of `config.peft_method`; (kwargs, source) as above.

    `total_steps`: the run's optimizer steps (AdaLoRA's schedule).
    """
    method = config.peft_method
    spec = config.lora_target_modules
    targets = spec if spec == "all-linear" else [name.strip() for name in spec.split(",") if name.strip()]
    kwargs: dict[str, Any] = {"task_type": PEFT_DEVIATIONS["task_type"].value}
    source: dict[str, str] = {}

    def put(field: str, value: Any, key: str) -> None:
        kwargs[field], source[field] = value, key

    if method in ("lora", "adalora"):
        put("lora_alpha", config.lora_alpha, "lora_alpha")
        put("lora_dropout", config.lora_dropout, "lora_dropout")
    if method in ("lora", "loha", "lokr"):
        put("r", config.lora_r, "lora_r")
    if method in ("loha", "lokr"):  # no input dropout: their rank/module dropouts stay at PEFT's 0
        put("alpha", config.lora_alpha, "lora_alpha")
    if method in LORA_LIKE:
        put("target_modules", targets, "lora_target_modules")
    if method == "adalora":
        put("target_r", config.lora_r, "lora_r")
        put("init_r", math.ceil(1.5 * config.lora_r), "lora_r")
        put("total_step", total_steps, "max_steps")
        # Warm up for the first 10 % and freeze the ranks for the last 20 % of the run (AdaLoRA's
        # schedule), reallocating every ~5 % in between; too short a run gets no schedule.
        warmup, final = (total_steps // 10, total_steps // 5) if total_steps >= 20 else (0, 0)
        kwargs.update(tinit=warmup, tfinal=final, deltaT=max(1, total_steps // 20))
    if method == "ia3" and targets != "all-linear":
        put("target_modules", targets, "lora_target_modules")
        kwargs["feedforward_modules"] = []
    # ia3 with all-linear: PEFT's per-architecture default targets (keys, values, MLP down-projection)
    if method in PROMPT_LEARNING:
        put("num_virtual_tokens", config.num_virtual_tokens, "num_virtual_tokens")
    if config.revision is not None:
        put("revision", config.revision, "revision")
    fields = peft_fields(method)
    for name, value in config.peft_args.items():
        put(name, _library_value(fields[name].hint, value), name)
    return kwargs, source


def build_library_config(cls, kwargs: dict[str, Any], source: dict[str, str], origins: dict[str, str]):
    """`cls(**kwargs)`; the library's exception becomes a UserError naming the key that caused it
    and where it was set (file:line or --flag)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return cls(**kwargs)
    except Exception as exc:
        raise UserError(_blame(cls, kwargs, source, origins, exc)) from None


def _blame(cls, kwargs, source, origins, exc) -> str:
    """Name the user-set value the library refuses: the first whose removal (back to the
    library's default) lets the config build."""
    user_fields = [f for f, key in source.items() if key in origins and f in kwargs]
    for name in user_fields:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cls(**{k: v for k, v in kwargs.items() if k != name})
        except Exception:
            continue
        key = source[name]
        shown = f"'{key}'" if key == name else f"'{key}' (its {cls.__name__} field '{name}')"
        return f"{origins[key]}: {shown} = {kwargs[name]!r} is refused by {cls.__name__}: {first_line(exc)}"
    keys = sorted({source[f] for f in user_fields})
    where = "; ".join(f"'{k}' at {origins[k]}" for k in keys) or "cpuft's defaults"
    return f"{cls.__name__} refuses the combination of {where}: {first_line(exc)}"


# ----------------------------------------------------------------------------- validation

# Stands in for the run's length when AdaLoRA is validated before the data is read: long enough
# that any schedule (tinit, tfinal) a user sets fits; the run checks the real length again.
_PLACEHOLDER_STEPS = 1_000_000


def validate_library_configs(config, origins: dict[str, str]) -> None:
    """Build SFTConfig and the PEFT config for `config` now, so the libraries' own checks run
    before anything is written or loaded. The plan's fields get neutral values here (CPU, fp32,
    no checkpointing): the plan is checked by the planner, and bf16 on a CPU without it would
    make TRL refuse a config the plan may well accept."""
    _check_combinations(config, origins)
    kwargs, source = sft_config_kwargs(config)
    neutral = dict(
        output_dir="cpuft-validation-never-written", use_cpu=True, bf16=False, fp16=False,
        activation_checkpointing=False, torch_compile=False, packing=config.packing,
    )
    with _accelerate_state_restored():
        build_library_config(sft_config_class(), {**kwargs, **neutral}, source, origins)
    steps = config.max_steps if config.max_steps > 0 else _PLACEHOLDER_STEPS
    kwargs, source = peft_config_kwargs(config, steps)
    build_library_config(peft_config_class(config.peft_method), kwargs, source, origins)


def _check_combinations(config, origins: dict[str, str]) -> None:
    trl = config.trl_args
    _check_reporting(config, origins)
    for name in ("torch_compile_backend", "torch_compile_mode"):
        if trl.get(name) is not None and config.torch_compile is not True:
            raise UserError(
                f"{origins.get(name, name)}: '{name}' turns torch.compile on, which the plan decides"
                " (only for runs of 5000+ steps); set torch_compile: true as well."
            )
    # Checks the libraries make only once the trainer starts, after the run directory is written.
    backend = trl.get("torch_compile_backend")
    if backend is not None:
        from accelerate.utils import DynamoBackend

        if backend.upper() not in {b.value for b in DynamoBackend}:
            known = ", ".join(b.value.lower() for b in DynamoBackend)
            raise UserError(f"{origins.get('torch_compile_backend')}: torch_compile_backend {backend!r} is not one"
                            f" accelerate knows: {known}.")
    if trl.get("use_liger_kernel"):
        from transformers.utils import is_liger_kernel_available

        if not is_liger_kernel_available():
            raise UserError(f"{origins.get('use_liger_kernel')}: use_liger_kernel needs the liger-kernel package"
                            " (Triton kernels for GPUs), which is not installed.")
    if trl.get("eval_strategy", "no") != "no" and config.eval_fraction == 0:
        raise UserError(
            f"{origins.get('eval_strategy', 'eval_strategy')}: eval_strategy {trl['eval_strategy']!r} needs"
            " held-out rows: set eval_fraction above 0."
        )


# The pip package each reporting integration needs (transformers' callback refuses to start
# without it, after the run directory is written).
REPORTING_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def loads_best_checkpoint(config) -> bool:
    """Whether the run ends by loading its best checkpoint (lowest eval_loss) into adapter/: with
    eval_steps, unless load_best_model_at_end is set false."""
    return bool(config.trl_args.get("load_best_model_at_end", config.eval_steps is not None))


def report_integration_names(value) -> list[str]:
    """report_to as transformers takes it: a list of integration names ('none' alone: none)."""
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip().lower() for item in items if str(item).strip()] or ["none"]


def _check_reporting(config, origins: dict[str, str]) -> None:
    """Every integration in report_to is installed, and none would need the network offline."""
    import importlib.util
    import os

    from huggingface_hub import is_offline_mode

    where = origins.get("report_to", "report_to (default)")
    names = report_integration_names(config.report_to)
    for name in names:
        package = REPORTING_PACKAGES.get(name)
        if package and importlib.util.find_spec(package.replace("-", "_")) is None:
            raise UserError(f"{where}: report_to {name} needs the '{package}' package, which is not installed:"
                            f" `pip install {package}`, or choose another report_to (none turns reporting off).")
    space = config.trl_args.get("trackio_space_id") or os.environ.get("TRACKIO_SPACE_ID")
    if "trackio" in names and space and is_offline_mode():
        raise UserError(f"{origins.get('trackio_space_id', 'TRACKIO_SPACE_ID')}: trackio logs to the Hub Space"
                        f" {space!r}, but HF_HUB_OFFLINE is set: unset the Space to log locally.")


@contextlib.contextmanager
def _accelerate_state_restored():
    """TrainingArguments sets up accelerate's process-wide PartialState (with use_cpu) as it is
    built. The validation copy must not decide the device of the real run, which may be CUDA:
    put the state back as it was."""
    from accelerate.state import PartialState

    saved = dict(PartialState._shared_state)
    try:
        yield
    finally:
        PartialState._shared_state.clear()
        PartialState._shared_state.update(saved)


# ----------------------------------------------------------------------------- helpers


def _library_value(hint: Any, value: Any) -> Any:
    """A typed config value as the library takes it: a mapping for a dataclass-typed field is
    built into that dataclass (PEFT does not do it for every such field)."""
    for member in typing.get_args(hint) or (hint,):
        origin = typing.get_origin(member) or member
        if isinstance(value, dict) and dataclasses.is_dataclass(origin) and isinstance(origin, type):
            try:
                return origin(**value)
            except TypeError:
                return value  # the library's own check names the problem
    return value


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def short_value(value: Any) -> str:
    if value is dataclasses.MISSING:
        return "(required)"
    if isinstance(value, enum.Enum):
        value = value.value
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 40 else text[:37] + "..."
