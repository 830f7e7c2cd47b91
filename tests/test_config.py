"""Job config: defaults < YAML < CLI, unknown keys named with a suggestion, types checked."""

from __future__ import annotations

import pytest

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
    with pytest.raises(UserError, match="eval_fraction"):
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
