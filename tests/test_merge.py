"""`cpuft merge`: the output is a stock transformers model equal to base + adapter(s).

The second adapter of the weighted merge is the same run's checkpoint-6 (a different point of the
same training), so one training serves every test here.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from cpuft.errors import UserError
from cpuft.inference.merge import PROVENANCE_FILE, merge_adapters, resolve_adapters
from tests.conftest import run_cpuft

# fp32 merge: W + s*B@A summed once instead of applied per forward; the difference is float rounding.
LOGITS_TOLERANCE = 1e-4
WEIGHTS_TOLERANCE = 1e-6


def lora_deltas(adapter_dir: Path) -> dict:
    """{base weight name: scaling * B @ A}, computed from the adapter files alone."""
    from safetensors.torch import load_file

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
    deltas = {}
    for key, lora_a in tensors.items():
        if ".lora_A." in key:
            module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
            deltas[f"{module}.weight"] = scaling * tensors[key.replace(".lora_A.", ".lora_B.")] @ lora_a
    return deltas


def test_merged_model_loads_with_plain_transformers_and_matches_base_plus_adapter(qa_run_dir, qa_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = run_cpuft("merge", qa_run_dir, "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (out / "adapter_config.json").exists()  # a full model, not an adapter
    assert json.loads((out / PROVENANCE_FILE).read_text())["combination"] is None

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the chat template travels with the merged model
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qa_model_dir), str(qa_run_dir / "adapter")).eval()
    base = AutoModelForCausalLM.from_pretrained(qa_model_dir).eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of Peru?"}], return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.inference_mode():
        expected, got, unadapted = reference(ids).logits, merged(ids).logits, base(ids).logits
    assert (got - expected).abs().max().item() < LOGITS_TOLERANCE
    assert (unadapted - expected).abs().max().item() > 100 * LOGITS_TOLERANCE  # the adapter changed something


def test_weighted_merge_is_base_plus_weighted_sum_of_deltas(qa_run_dir, qa_model_dir, tmp_path):
    from safetensors.torch import load_file

    adapters = resolve_adapters([str(qa_run_dir), str(qa_run_dir / "checkpoint-6")], [0.7, -0.3], base=None)
    result = merge_adapters(adapters, tmp_path / "blend", combination="cat", log=lambda *_: None)
    assert result.combination == "cat"

    base = load_file(str(qa_model_dir / "model.safetensors"))
    merged = load_file(str(tmp_path / "blend" / "model.safetensors"))
    final, early = lora_deltas(qa_run_dir / "adapter"), lora_deltas(qa_run_dir / "checkpoint-6")
    assert final.keys() == early.keys() and final
    for name in final:
        expected = base[name] + 0.7 * final[name] - 0.3 * early[name]
        assert (merged[name] - expected).abs().max().item() < WEIGHTS_TOLERANCE, name
    untouched = [k for k in base if k not in final]
    assert untouched and all((merged[k] == base[k]).all() for k in untouched if k in merged)


def test_merge_refuses_what_it_cannot_do(qa_run_dir, tmp_path):
    with pytest.raises(UserError, match="one weight per adapter"):
        resolve_adapters([str(qa_run_dir)], [0.5, 0.5], base=None)

    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    other_base = build_tiny_model(tmp_path / "other-base", texts=["a b c d"] * 20, spec=TinyModelSpec(
        vocab_size=300, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=86,
    ))
    foreign = tmp_path / "foreign-adapter"
    shutil.copytree(qa_run_dir / "adapter", foreign)
    config = json.loads((foreign / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(other_base)
    (foreign / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="different base models"):
        resolve_adapters([str(qa_run_dir), str(foreign)], None, base=None)

    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    result = run_cpuft("merge", qa_run_dir, "--out", occupied)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert (occupied / "keep.txt").read_text() == "mine" and len(list(occupied.iterdir())) == 1

    with pytest.raises(UserError, match="--density"):
        merge_adapters(resolve_adapters([str(qa_run_dir)], [0.5], None), tmp_path / "x", combination="ties")
