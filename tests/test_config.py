"""Job config: defaults < YAML < CLI, unknown keys named with a suggestion, types checked."""

from __future__ import annotations

import argparse
import re

import pytest

from cpuft.config.cli_args import add_config_arguments, config_values
from cpuft.config.job import SFTJobConfig, read_config_file, resolve_config
from cpuft.errors import UserError
from cpuft.planning.plan import PlanRequest


def test_precedence_defaults_then_yaml_then_cli(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("lora_r: 8\nlearning_rate: 0.001\nmax_steps: 40\n")
    config = resolve_config(str(path), {"max_steps": "7"})
    assert config.lora_r == 8  # from YAML
    assert config.learning_rate == 0.001  # from YAML
    assert config.max_steps == 7  # CLI beats YAML, and the string is coerced
    assert config.lora_alpha == SFTJobConfig().lora_alpha  # default kept


def test_base_config_sits_between_defaults_and_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("lora_r: 4\n")
    config = resolve_config(str(path), {}, base={"lora_r": 32, "seed": 7})
    assert (config.lora_r, config.seed) == (4, 7)


def test_unknown_key_names_line_and_nearest_valid_key(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("model: x\nlearning_rat: 0.1\n")
    with pytest.raises(UserError) as info:
        read_config_file(path)
    message = str(info.value)
    assert f"{path}:2" in message
    assert "'learning_rat'" in message and "Did you mean 'learning_rate'" in message


def test_nearest_name_prefers_cpufts_own_keys_then_the_libraries(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("lora_rank: 8\nneftune_alpha: 5\n")
    with pytest.raises(UserError, match="Did you mean 'lora_r'"):  # not TrainingArguments' local_rank
        read_config_file(path)
    path.write_text("neftune_alpha: 5\n")
    with pytest.raises(UserError, match=re.escape(f"{path}:1: unknown config key 'neftune_alpha'. Did you mean 'neftune_noise_alpha'")):
        read_config_file(path)


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("max_steps: ten\n", "'max_steps' must be an integer"),
        ("max_steps: 2.5\n", "'max_steps' must be an integer"),
        ("dtype: fp8\n", "allowed values: auto, fp32, bf16, fp16"),
        ("packing: maybe\n", "'packing' must be true or false"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("model: [unclosed\n", "not valid YAML"),
    ],
)
def test_bad_values_are_named(tmp_path, text, fragment):
    path = tmp_path / "job.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=fragment):
        resolve_config(str(path), {})


def test_missing_config_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_config(str(tmp_path / "nope.yaml"), {})


def test_range_checks():
    with pytest.raises(UserError, match="--eval-fraction: eval_fraction must be in"):
        resolve_config(None, {"eval_fraction": "1.5"})
    with pytest.raises(UserError, match="max_steps"):
        resolve_config(None, {"max_steps": "0"})


def test_optional_fields_accept_none_and_numbers(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text("threads: null\nper_device_batch_size: 2\ngradient_checkpointing: true\n")
    config = resolve_config(str(path), {})
    assert config.threads is None and config.per_device_batch_size == 2 and config.gradient_checkpointing is True
    request = PlanRequest.from_job(config)
    assert request.per_device_batch_size == 2 and request.gradient_checkpointing is True


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--packing"], {"packing": True}),
        (["--packing", "false", "--max-steps", "3"], {"packing": False, "max_steps": 3}),
        (["--no-packing"], {"packing": False}),
        (["--use-dora", "--max-grad-norm=0.5"], {"use_dora": True, "max_grad_norm": 0.5}),
        (["--no-use-rslora"], {"use_rslora": False}),
    ],
)
def test_flags_for_true_false_keys_and_library_fields(argv, expected):
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = resolve_config(None, config_values(parser.parse_args(argv)))
    assert {key: config.to_dict()[key] for key in expected} == expected


def test_the_job_is_its_sections_with_flat_keys():
    """SFTJobConfig is the sections (model, data, training, adapter, hardware, evaluation,
    output) side by side: flat keyword arguments, attributes and dataclasses.replace work on any
    key, and a stage can take one section as a copy."""
    import dataclasses

    from cpuft.config.job import CONFIG_FIELDS, KEY_GROUPS
    from cpuft.config.sections import SECTIONS, HardwareSection, TrainingSection, section_keys

    config = SFTJobConfig(model="m", dataset="sample", max_steps=3, trl_args={"max_grad_norm": 0.5})
    config = dataclasses.replace(config, quant="nf4")
    config.learning_rate = 1e-3
    hardware = config.section(HardwareSection)
    assert type(hardware) is HardwareSection and hardware.quant == "nf4" and not hasattr(hardware, "model")
    training = config.section(TrainingSection)
    assert (training.max_steps, training.learning_rate) == (3, 1e-3)
    training.trl_args["max_grad_norm"] = 1.0  # a copy: the job is unchanged
    assert config.trl_args == {"max_grad_norm": 0.5}

    keys = [name for section in SECTIONS for name in section_keys(section)]
    assert list(CONFIG_FIELDS) == keys == [f.name for f in dataclasses.fields(SFTJobConfig) if f.name in keys]
    assert len(set(keys)) == len(keys)  # a key belongs to one section
    assert list(KEY_GROUPS) == [next(iter(section_keys(section))) for section in SECTIONS]
