"""`cpuft generate`, `cpuft chat`, `cpuft eval` and cpuft.inference.loading on a real (tiny) fine-tune.

One LoRA run (`qa_run_dir`, conftest) is shared with test_merge.py. The CLI is exercised where the
behaviour is the CLI's (streaming chat, exit codes, files written); the rest runs in-process.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from cpuft.errors import UserError
from cpuft.inference.evaluate import evaluate_loss
from cpuft.inference.loading import (
    GenerationSettings,
    generate,
    load_for_inference,
    resolve_source,
)
from tests.conftest import qa_rows, run_cpuft


def _model_and_tokenizer(loaded):
    return loaded.model, loaded.tokenizer


def reference_reply(qa_model_dir: Path, adapter_dir: Path, messages: list[dict], max_new_tokens: int) -> str:
    """Greedy reply computed with stock transformers + PEFT only: what cpuft must reproduce."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qa_model_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qa_model_dir), str(adapter_dir)).eval()
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_eval_reproduces_the_trainers_eval_loss_and_writes_generations(qa_run_dir):
    result = run_cpuft("eval", "--model", qa_run_dir, "--generations", "3", "--max-new-tokens", "8", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((qa_run_dir / "eval" / "eval.json").read_text())
    trainer_eval_loss = json.loads((qa_run_dir / "summary.json").read_text())["eval_loss"]
    # Same held-out rows (the run's dataset, fraction and seed), same tokenisation, one batch.
    assert report["loss"] == pytest.approx(trainer_eval_loss, rel=1e-4)
    assert report["perplexity"] == pytest.approx(math.exp(report["loss"]), rel=1e-9)
    assert report["rows"] == json.loads((qa_run_dir / "summary.json").read_text())["eval_rows"]

    lines = (qa_run_dir / "eval" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 3
    sample = json.loads(lines[0])
    assert sample["messages"][-1]["role"] == "user"
    completions = {row["prompt"]: row["completion"] for row in qa_rows()}
    assert sample["reference"] == completions[sample["messages"][-1]["content"]]
    assert isinstance(sample["generation"], str)


def test_generate_prints_the_same_greedy_reply_as_stock_peft(qa_run_dir, qa_model_dir):
    prompt = "What is the capital of Peru?"
    # fp32 pinned: the stock reference runs in fp32, and bf16 (chosen on AVX-512-BF16/AMX CPUs)
    # can flip a greedy token of an untrained-looking tiny model.
    result = run_cpuft("generate", "--model", qa_run_dir, "--dtype", "fp32", "--max-new-tokens", "8", prompt)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = reference_reply(qa_model_dir, qa_run_dir / "adapter", [{"role": "user", "content": prompt}], 8)
    assert result.stdout == expected + "\n"
    assert "+ adapter" in result.stderr  # says what it loaded


def test_chat_streams_replies_keeps_history_and_resets(qa_run_dir, qa_model_dir):
    turns = "What is 2 plus 3?\nWhat is the capital of Chile?\n/reset\nWhat is 4 plus 5?\n/exit\nnever read\n"
    result = run_cpuft("chat", "--model", qa_run_dir, "--dtype", "fp32", "--max-new-tokens", "6", stdin=turns)
    assert result.returncode == 0, result.stderr[-3000:]
    replies = [part[:-1] for part in result.stdout.split("assistant> ")[1:]]  # each ends with "\n"
    assert len(replies) == 3

    adapter = qa_run_dir / "adapter"
    first = reference_reply(qa_model_dir, adapter, [{"role": "user", "content": "What is 2 plus 3?"}], 6)
    second = reference_reply(qa_model_dir, adapter, [
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": first.strip()},
        {"role": "user", "content": "What is the capital of Chile?"},
    ], 6)
    after_reset = reference_reply(qa_model_dir, adapter, [{"role": "user", "content": "What is 4 plus 5?"}], 6)
    assert replies == [first, second, after_reset]


def test_merged_and_quantised_loads_score_close_to_the_adapter(qa_run_dir, qa_dataset):
    from cpuft.data.prepare import prepare_dataset
    from cpuft.inference.int8 import available_int8_methods

    rows = list(prepare_dataset(str(qa_dataset), eval_fraction=0.0).train)
    source = resolve_source(str(qa_run_dir))
    adapter = evaluate_loss(*_model_and_tokenizer(load_for_inference(source)), rows, batch_size=8)
    merged = evaluate_loss(*_model_and_tokenizer(load_for_inference(source, merge=True)), rows, batch_size=8)
    assert merged.tokens == adapter.tokens
    assert merged.loss == pytest.approx(adapter.loss, abs=1e-5)
    for method, missing in available_int8_methods().items():
        if missing:
            continue
        loaded = load_for_inference(source, int8=method)
        assert loaded.precision == f"int8 ({method})"
        # int8 rounding moves the loss a little; a broken path (wrong scales, lost adapter) moves it a lot.
        assert evaluate_loss(loaded.model, loaded.tokenizer, rows, batch_size=8).loss == pytest.approx(adapter.loss, rel=0.01), method


def test_nf4_base_with_adapter_on_top(qa_run_dir, qa_dataset):
    pytest.importorskip("bitsandbytes")
    import torch

    from cpuft.data.prepare import prepare_dataset

    device = "cuda" if torch.cuda.is_available() else "cpu"  # bitsandbytes' x86 backend runs NF4 too
    rows = list(prepare_dataset(str(qa_dataset), eval_fraction=0.0).train)[:8]
    source = resolve_source(str(qa_run_dir))
    full = evaluate_loss(*_model_and_tokenizer(load_for_inference(source)), rows, batch_size=8)
    loaded = load_for_inference(source, nf4=True, device=device)
    assert type(loaded.model).__name__ == "PeftModelForCausalLM"  # adapter stays unmerged over 4-bit weights
    assert evaluate_loss(loaded.model, loaded.tokenizer, rows, batch_size=8).loss == pytest.approx(full.loss, rel=0.02)
    assert isinstance(generate(loaded, GenerationSettings(max_new_tokens=3), messages=[{"role": "user", "content": "hi"}]), str)


# ----------------------------------------------------------------------------- errors a user can act on


def test_adapter_for_another_base_model_exits_2_with_a_message(qa_run_dir, tmp_path):
    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    other = build_tiny_model(tmp_path / "other", texts=["a b c d e f g"] * 20, spec=TinyModelSpec(
        vocab_size=300, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, intermediate_size=86,
    ))
    result = run_cpuft("generate", "--model", qa_run_dir, "--base", other, "hi")
    assert result.returncode == 2
    assert "does not fit" in result.stderr and "--base" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_directory_without_adapter_points_to_resume_and_checkpoint(qa_run_dir, tmp_path):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(qa_run_dir / "config.yaml", unfinished / "config.yaml")
    shutil.copytree(qa_run_dir / "checkpoint-6", unfinished / "checkpoint-6")
    with pytest.raises(UserError) as error:
        resolve_source(str(unfinished))
    message = str(error.value)
    assert "--resume" in message and str(unfinished / "checkpoint-6") in message
    # ... and the checkpoint it names does load.
    assert resolve_source(str(unfinished / "checkpoint-6")).kind == "adapter"


def test_missing_tokenizer_is_named(qa_run_dir, qa_model_dir, tmp_path):
    adapter_only, base_only = tmp_path / "adapter", tmp_path / "base"
    adapter_only.mkdir()
    base_only.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(qa_run_dir / "adapter" / name, adapter_only / name)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        shutil.copy(qa_model_dir / name, base_only / name)
    with pytest.raises(UserError, match="no tokenizer found"):
        load_for_inference(resolve_source(str(adapter_only), base=str(base_only)))


def test_moved_base_model_asks_for_base(qa_run_dir, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(qa_run_dir / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="pass --base"):
        resolve_source(str(adapter))


def test_directory_that_is_not_a_model(tmp_path):
    with pytest.raises(UserError, match="neither a cpuft run directory"):
        resolve_source(str(tmp_path))
