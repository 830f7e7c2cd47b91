"""TRL SFTConfig and PEFT config fields as cpuft keys: they reach the trainer, and bad ones stop
the job before anything is written.

The end-to-end test reads what an outsider can read: the run's config.yaml, the saved adapter's
adapter_config.json and weights, and the checkpoint's training_args.bin (transformers pickles
the TrainingArguments the trainer ran with there).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import yaml

from cpuft.config.job import resolve_config
from cpuft.errors import UserError
from tests.conftest import run_cpuft

FAST = ["--per-device-batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "64",
        "--eval-fraction", "0", "--dtype", "fp32", "--no-progress"]


def training_args(checkpoint_dir):
    import torch

    return torch.load(checkpoint_dir / "training_args.bin", weights_only=False)


@pytest.mark.slow
def test_trl_and_peft_fields_reach_the_trainer_and_survive_resume(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    job = tmp_path / "job.yaml"
    job.write_text("max_steps: 2\nadam_beta2: 0.98\nsave_steps: 2\n")
    result = run_cpuft("sft", "--config", job, "--model", tiny_model_dir, "--dataset", "sample",
                       "--output-dir", run_dir, "--max-grad-norm", "0.5", "--use-dora", "true", *FAST)
    assert result.returncode == 0, result.stderr[-3000:]

    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert (saved["max_grad_norm"], saved["use_dora"], saved["adam_beta2"]) == (0.5, True, 0.98)
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["use_dora"] is True
    from safetensors import safe_open

    with safe_open(str(run_dir / "adapter" / "adapter_model.safetensors"), "pt") as weights:
        assert any("lora_magnitude_vector" in name for name in weights.keys())  # DoRA's magnitudes
    args = training_args(run_dir / "checkpoint-2")
    assert (args.max_grad_norm, args.adam_beta2) == (0.5, 0.98)
    assert args.learning_rate == 2e-4  # cpuft's default, not TRL's 2e-5

    # --resume takes the pass-through values from the saved config.yaml, not from the flags
    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--max-steps", "3", "--save-steps", "3",
                       "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    args = training_args(run_dir / "checkpoint-3")
    assert (args.max_grad_norm, args.adam_beta2, args.max_steps) == (0.5, 0.98, 3)
    assert json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["use_dora"] is True


@pytest.mark.slow
@pytest.mark.parametrize(
    "yaml_text,flags,fragments",
    [
        ("", ["--lr-scheduler-type", "bogus"],
         ["--lr-scheduler-type: 'lr_scheduler_type' = 'bogus' is refused by SFTConfig", "not a valid SchedulerType"]),
        ("max_steps: 2\nlr_scheduler_type: bogus\n", [],
         ["job.yaml:2: 'lr_scheduler_type' = 'bogus' is refused by SFTConfig"]),
        ("max_steps: 2\nuse_dora: true\nmax_grad_nrom: 0.5\n", [],
         ["job.yaml:3: unknown config key 'max_grad_nrom'. Did you mean 'max_grad_norm'?"]),
        ("", ["--max-grad-nrom", "0.5"], ["unrecognized flag --max-grad-nrom. Did you mean --max-grad-norm?"]),
        ("", ["--max-grad-norm", "abc"], ["--max-grad-norm: 'max_grad_norm' must be a number, got 'abc'"]),
        ("use_dora: maybe\n", [], ["job.yaml:1: 'use_dora' must be true or false, got 'maybe'"]),
        ("", ["--bf16", "true"], ["'bf16' (TRL's SFTConfig) is set by cpuft", "use 'dtype' instead"]),
        ("", ["--peft-method", "loha", "--use-dora"], ["'use_dora' is not a field of LoHaConfig"]),
        ("", ["--neftune-noise-alpha", "5", "--use-rslora"], []),  # valid: the dry run goes ahead
    ],
)
def test_bad_library_values_exit_2_before_anything_is_written(tmp_path, tiny_model_dir, yaml_text, flags, fragments):
    job = tmp_path / "job.yaml"
    job.write_text(yaml_text)
    out = tmp_path / "out"
    result = run_cpuft("sft", "--config", job, "--model", tiny_model_dir, "--dataset", "sample",
                       "--output-dir", out, "--dry-run", *flags)
    if not fragments:
        assert result.returncode == 0, result.stderr[-2000:]
        return
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in result.stderr
    assert not out.exists()


def test_flag_text_is_typed_like_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("modules_to_save: [lm_head]\nadam_beta2: 0.9\n")
    config = resolve_config(str(path), {
        "adam_beta2": "0.98",  # the flag beats the file
        "layers_to_transform": "[0, 1]",  # PEFT allows it only with a list of target modules:
        "lora_target_modules": "q_proj,v_proj",
        "hub_strategy": "end",
        "neftune_noise_alpha": "5",
        "use_rslora": "yes",
    })
    assert config.trl_args == {"adam_beta2": 0.98, "hub_strategy": "end", "neftune_noise_alpha": 5.0}
    assert config.peft_args == {"modules_to_save": ["lm_head"], "layers_to_transform": [0, 1], "use_rslora": True}
    assert resolve_config(None, {"modules_to_save": "embed_tokens,lm_head"}).peft_args == {
        "modules_to_save": ["embed_tokens", "lm_head"]}


@pytest.mark.parametrize(
    "values,fragment",
    [
        ({"r": "8"}, "use 'lora_r' instead"),
        ({"target_modules": "q_proj"}, "use 'lora_target_modules' instead"),
        ({"per_device_train_batch_size": "2"}, "use 'per_device_batch_size' instead"),
        ({"activation_checkpointing": "true"}, "use 'gradient_checkpointing' instead"),
        ({"optim": "adamw_torch"}, "use 'optimizer' instead"),
        ({"task_type": "SEQ_CLS"}, "fixed by cpuft"),
        ({"torch_compile_mode": "max-autotune"}, "set torch_compile: true as well"),
        ({"eval_strategy": "steps", "eval_fraction": "0"}, "set eval_fraction above 0"),
        ({"torch_compile": "true", "torch_compile_backend": "no-such-backend"}, "is not one accelerate knows"),
        pytest.param({"use_liger_kernel": "true"}, "needs the liger-kernel package", marks=pytest.mark.skipif(
            importlib.util.find_spec("liger_kernel") is not None, reason="liger-kernel is installed here")),
        ({"peft_method": "adalora", "max_steps": "100", "tinit": "90", "tfinal": "20"}, "'tinit'"),
    ],
)
def test_one_key_per_fact_and_the_plans_fields_are_cpufts(values, fragment):
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        resolve_config(None, values)


def test_torch_compile_mode_is_passed_when_compiling_is_asked_for():
    config = resolve_config(None, {"torch_compile": "true", "torch_compile_mode": "reduce-overhead"})
    assert config.trl_args == {"torch_compile_mode": "reduce-overhead"}


def test_validation_leaves_accelerates_device_state_alone():
    """Building the validation SFTConfig (use_cpu) must not fix the device of a later CUDA run:
    accelerate's PartialState is process-wide and the first one built wins."""
    from accelerate.state import PartialState

    before = dict(PartialState._shared_state)
    resolve_config(None, {"max_grad_norm": "0.5"})
    assert PartialState._shared_state == before


def test_help_keeps_cpufts_keys_and_points_to_the_library_pages():
    result = run_cpuft("sft", "--help")
    assert result.returncode == 0
    assert "--lora-r" in result.stdout and "--help-trl" in result.stdout and "--help-peft" in result.stdout
    assert "--max-grad-norm 0.5" in result.stdout  # the pointer's example
    assert "--adam-beta2" not in result.stdout  # the ~200 library fields stay off this page

    trl_page = run_cpuft("sft", "--help-trl").stdout
    # TRL's published defaults next to cpuft's (TRL's SFTConfig docs: learning_rate 2e-5)
    assert "cpuft: 0.0002, TRL: 2e-05" in " ".join(trl_page.split())
    assert "--max-grad-norm" in trl_page and "use dtype" in " ".join(trl_page.split())
    peft_page = " ".join(run_cpuft("sft", "--help-peft", "lora").stdout.split())
    assert "--use-dora" in peft_page and "use lora_r; cpuft: 16, PEFT: 8" in peft_page


def test_machine_type_is_checked_before_anything_is_written(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--output-dir", out,
                       "--machine-type", "c9-imaginary-8")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "--machine-type: unknown machine type 'c9-imaginary-8'" in result.stderr
    assert "c3-standard-44" in result.stderr  # the known ones are listed
    assert not out.exists()


def test_config_is_the_bottom_layer():
    """Resolving a whole job (machine_type included) loads no planning, hardware or train module."""
    code = textwrap.dedent("""
        import sys
        import cpuft.config.cli_args, cpuft.config.job, cpuft.config.passthrough
        from cpuft.config.job import resolve_config
        resolve_config(None, {"machine_type": "c3-standard-44", "max_grad_norm": "0.5", "use_dora": "true"})
        print(sorted(m for m in sys.modules if m.startswith("cpuft.")))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = eval(result.stdout.strip().splitlines()[-1])
    assert [m for m in loaded if m.split(".")[1] in ("planning", "hardware", "train", "data", "inference")] == []


def test_every_cpuft_key_named_like_an_sftconfig_field_reaches_it():
    """A cpuft key sharing an SFTConfig field's name either sets it as it is (trl=True) or is the
    plan's (the run sets the field): none is silently ignored, and a default that differs from
    TRL's own is CpuftSFTConfig's default too, with why."""
    from cpuft.config.job import CONFIG_FIELDS
    from cpuft.config.passthrough import AT_RUN_TIME, TRL_PER_RUN, trl_fields
    from cpuft.config.trl_config import cpuft_defaults, reason

    for name, field in CONFIG_FIELDS.items():
        if name not in trl_fields():
            continue
        if field.metadata.get("trl"):
            library_default = trl_fields()[name].default
            if field.default != library_default:
                assert cpuft_defaults()[name].default == field.default and reason(cpuft_defaults()[name]), name
        else:
            assert TRL_PER_RUN[name].value is AT_RUN_TIME, name


def test_cpuft_sft_config_carries_cpufts_defaults_and_stays_trls_sft_config():
    """CpuftSFTConfig overrides defaults only: each field keeps TRL's type, the fields cpuft pins
    are among them, and the arguments pickle as TRL's own SFTConfig (training_args.bin loads
    without cpuft)."""
    import pickle
    import typing

    from trl import SFTConfig

    from cpuft.config.passthrough import TRL_PINNED, TRL_PER_RUN
    from cpuft.config.trl_config import CpuftSFTConfig, cpuft_defaults

    trl_types = typing.get_type_hints(SFTConfig)
    cpuft_types = typing.get_type_hints(CpuftSFTConfig)
    for name in cpuft_defaults():
        assert cpuft_types[name] == trl_types[name], name
        assert name not in TRL_PER_RUN, name  # a value decided per run is no default
    assert set(TRL_PINNED) <= set(cpuft_defaults())

    args = CpuftSFTConfig(output_dir="unused", use_cpu=True, bf16=False, activation_checkpointing=False)
    assert (args.learning_rate, args.max_length, args.disable_tqdm, args.save_total_limit) == (2e-4, 512, True, 2)
    data = pickle.dumps(args)
    assert b"cpuft" not in data
    loaded = pickle.loads(data)
    assert type(loaded) is SFTConfig and loaded.learning_rate == 2e-4


def test_the_batch_queue_takes_the_same_keys(tmp_path, tiny_model_dir):
    from cpuft.batch.queue import load_queue

    queue = tmp_path / "queue.yaml"
    queue.write_text(textwrap.dedent(f"""\
        defaults:
          model: {tiny_model_dir}
          dataset: sample
          max_grad_norm: 0.5
        jobs:
          - name: dora
            use_dora: true
          - name: typo
            adam_betta2: 0.9
          - name: bad
            lr_scheduler_type: bogus
        """))
    with pytest.raises(UserError) as info:
        load_queue(queue, check_files=False)
    message = str(info.value)
    assert f"{queue}:9: job 'typo': unknown config key 'adam_betta2'. Did you mean 'adam_beta2'?" in message
    assert f"{queue}:11: job 'bad': 'lr_scheduler_type' = 'bogus' is refused by SFTConfig" in message

    queue.write_text(queue.read_text().split("  - name: typo")[0])
    job = load_queue(queue, check_files=False).job("dora")
    assert job.config.trl_args == {"max_grad_norm": 0.5} and job.config.peft_args == {"use_dora": True}
