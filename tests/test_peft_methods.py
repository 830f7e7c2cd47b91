"""Every `peft_method` trains a few steps on the tiny model through cpuft's recipe, saves, and reloads.

The reload check is the one a user relies on: stock PEFT's `PeftModel.from_pretrained` on the
saved adapter gives the trained model's logits, and those differ from the base model's.
"""

from __future__ import annotations

import random

import pytest
import torch

from cpuft.config.job import resolve_config
from cpuft.hardware.probe import probe_machine
from cpuft.train.peft_methods import PEFT_METHODS, build_peft_config
from cpuft.train.sft import prepare_run, train_run
from tests.conftest import write_jsonl

WORDS = "the cat sat on a mat while the dog ran to the park and birds sang in tall green trees".split()


def conversation_rows(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    say = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    return [
        {"messages": [{"role": "user", "content": say(rng.randint(4, 10))},
                      {"role": "assistant", "content": say(rng.randint(8, 20))}]}
        for _ in range(count)
    ]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """Its own tiny model and data, so these tests need no bundled files."""
    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    root = tmp_path_factory.mktemp("peft_methods")
    rows = conversation_rows(24)
    texts = [" ".join(m["content"] for m in row["messages"]) for row in rows] * 4
    model = build_tiny_model(root / "tiny", texts=texts, spec=TinyModelSpec(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128))
    data = write_jsonl(root / "data.jsonl", rows)
    return model, data


def train_method(model_dir, data, run_dir, method: str, **extra):
    # fp32 on every CPU: the reload check below compares logits at fp32 tolerance.
    values = dict(model=str(model_dir), dataset=str(data), output_dir=str(run_dir), peft_method=method,
                  max_steps=3, per_device_batch_size=4, gradient_accumulation_steps=1, max_length=64,
                  eval_fraction=0.0, learning_rate=5e-2, warmup_steps=0, num_virtual_tokens=4,
                  lora_r=4, save_steps=100, device="cpu", dtype="fp32", **extra)
    run = prepare_run(resolve_config(None, values), probe_machine(), log=lambda *a: None)
    return run, train_run(run, show_progress=False, log=lambda *a: None)


def logits_of(model, input_ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_method_trains_saves_and_reloads(tiny_setup, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny_setup
    _, result = train_method(model_dir, data, tmp_path / "run", method)
    summary = result.summary
    assert result.status == "completed"
    assert summary.steps == 3
    assert summary.final_loss is not None and summary.final_loss == summary.final_loss  # not NaN
    assert 0 < summary.trainable_params < summary.total_params
    adapter_dir = tmp_path / "run" / "adapter"
    assert (adapter_dir / "adapter_config.json").is_file()

    input_ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 60]])
    trained = logits_of(result.model, input_ids)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base_logits = logits_of(base, input_ids)
    reloaded = PeftModel.from_pretrained(base, adapter_dir)
    assert reloaded.peft_config["default"].peft_type.value.lower().replace("_", "") == {
        "lora": "lora", "loha": "loha", "lokr": "lokr", "ia3": "ia3", "adalora": "adalora",
        "prompt_tuning": "prompttuning", "prefix_tuning": "prefixtuning", "p_tuning": "ptuning",
    }[method]
    reloaded_logits = logits_of(reloaded, input_ids)
    # Prompt-learning methods prepend virtual tokens; compare the real tokens' positions.
    trained, reloaded_logits = trained[:, -input_ids.shape[1]:], reloaded_logits[:, -input_ids.shape[1]:]
    torch.testing.assert_close(reloaded_logits, trained, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(reloaded_logits, base_logits, atol=1e-4), "training left the model unchanged"


def test_adalora_needs_the_run_length():
    from cpuft.errors import UserError

    config = resolve_config(None, {"peft_method": "adalora", "lora_r": "8", "lora_alpha": "16", "lora_dropout": "0"})
    with pytest.raises(UserError, match="total steps"):
        build_peft_config(config, total_steps=None)
    adalora = build_peft_config(config, total_steps=100)
    assert (adalora.target_r, adalora.init_r, adalora.total_step) == (8, 12, 100)
    # AdaLoRA's schedule over 100 steps: warm-up 10, final 20, reallocation every 5
    assert (adalora.tinit, adalora.tfinal, adalora.deltaT) == (10, 20, 5)


def test_pass_through_fields_reach_each_methods_config():
    """A PEFT field set as a cpuft key ends up on the method's own config object; cpuft's keys
    still set the fields they map to."""
    lora = build_peft_config(resolve_config(None, {"use_rslora": "true", "modules_to_save": "lm_head", "lora_r": "4"}))
    assert (lora.use_rslora, lora.modules_to_save, lora.r, lora.lora_alpha) == (True, ["lm_head"], 4, 32)
    loha = build_peft_config(resolve_config(None, {"peft_method": "loha", "rank_dropout": "0.1", "lora_alpha": "8"}))
    assert (loha.rank_dropout, loha.alpha, loha.r) == (0.1, 8, 16)
    adalora = build_peft_config(resolve_config(None, {"peft_method": "adalora", "tinit": "3"}), total_steps=100)
    assert (adalora.tinit, adalora.tfinal) == (3, 20)  # the user's warm-up, cpuft's final phase
    prefix = build_peft_config(resolve_config(None, {"peft_method": "prefix_tuning", "prefix_projection": "true",
                                                     "num_virtual_tokens": "4"}))
    assert (prefix.prefix_projection, prefix.num_virtual_tokens) == (True, 4)


def test_unknown_method_is_rejected_with_the_choices(tiny_setup, tmp_path):
    from tests.conftest import run_cpuft

    model_dir, data = tiny_setup
    result = run_cpuft("sft", "--model", model_dir, "--dataset", data, "--peft-method", "dora",
                       "--output-dir", tmp_path / "run")
    assert result.returncode == 2
    assert "lokr" in result.stderr and "prefix_tuning" in result.stderr
