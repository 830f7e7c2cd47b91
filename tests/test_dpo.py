"""`cpuft dpo` end to end on a tiny model: it learns a preference it can generalise, checked on
held-out pairs with stock transformers + PEFT; SIGTERM then --resume gives the uninterrupted
adapter; it starts from an SFT run directory; the plan counts pairs and the reference forward;
malformed preference rows are refused with nothing written.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_cpuft, write_jsonl
from tests.test_batch_preemption import max_abs_difference

TOPICS = ["the cache", "a thread", "the memory bus", "a checkpoint", "the adapter rank", "a batch", "the queue",
          "the scheduler", "a spot VM", "the optimizer", "a token", "the loss", "the learning rate", "a core"]


def preference_pairs(seed: int, count: int) -> list[dict]:
    """Pairs whose chosen reply is helpful and always framed the same way, and whose rejected reply
    is a curt refusal: a preference a model can learn from some pairs and apply to others."""
    rng = random.Random(seed)
    rows = []
    for i in range(count):
        topic, other = rng.sample(TOPICS, 2)
        rows.append({
            "prompt": [{"role": "user", "content": f"Question {i}: how does {topic} relate to {other}?"}],
            "chosen": [{"role": "assistant", "content": f"Happy to help. {topic.capitalize()} works with {other};"
                                                        " I hope this helps."}],
            "rejected": [{"role": "assistant", "content": rng.choice(["Dunno.", "No idea.", "Ask someone else."])}],
        })
    return rows


DPO_FLAGS = ("--max-length", "64", "--lora-dropout", "0", "--eval-fraction", "0", "--no-progress")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> tuple[Path, list[dict]]:
    """(training pairs file, held-out pairs the run never sees)."""
    data = tmp_path_factory.mktemp("pairs")
    return write_jsonl(data / "train.jsonl", preference_pairs(seed=1, count=48)), preference_pairs(seed=2, count=16)


@pytest.fixture(scope="module")
def dpo_run(tiny_model_dir, pairs, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    result = run_cpuft("dpo", "--model", tiny_model_dir, "--dataset", pairs[0], "--output-dir", run_dir,
                       "--max-steps", "12", "--learning-rate", "2e-3", "--per-device-batch-size", "4",
                       "--gradient-accumulation-steps", "1", "--save-steps", "4", *DPO_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def completion_logprob(model, tokenizer, prompt: list[dict], completion: list[dict]) -> float:
    """log p(completion | prompt) under `model`, summed over the completion's tokens: stock
    transformers, the chat template rendering prompt and prompt + completion."""
    import torch

    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, add_generation_prompt=True, return_dict=False)
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=False)
    assert full_ids[:len(prompt_ids)] == prompt_ids
    ids = torch.tensor([full_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, 1:]
    picked = logprobs.gather(1, targets[:, None])[:, 0]
    return picked[len(prompt_ids) - 1:].sum().item()


def margins(model, tokenizer, rows: list[dict]) -> list[float]:
    return [completion_logprob(model, tokenizer, r["prompt"], r["chosen"]) - completion_logprob(model, tokenizer, r["prompt"], r["rejected"])
            for r in rows]


def test_dpo_raises_the_margin_on_held_out_pairs_checked_with_stock_peft(tiny_model_dir, pairs, dpo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held_out = pairs[1]
    tokenizer = AutoTokenizer.from_pretrained(dpo_run / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32").eval()
    before = margins(base, tokenizer, held_out)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype="float32"),
                                      dpo_run / "adapter").eval()
    after = margins(tuned, tokenizer, held_out)
    raised = sum(a > b for a, b in zip(after, before))
    assert raised >= 0.75 * len(held_out), (before, after)

    summary = json.loads((dpo_run / "summary.json").read_text())
    assert summary["job"] == "dpo" and summary["steps"] == 12
    assert summary["preference"]["beta"] == 0.1 and summary["preference"]["starting_point"] == "base model"
    logged = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    assert any("rewards/accuracies" in r and "rewards/margins" in r for r in logged)
    plan = json.loads((dpo_run / "plan.json").read_text())["plan"]
    assert plan["job"] == "dpo" and plan["per_device_batch_size"] == 4


@pytest.fixture(scope="module")
def dpo_from_sft(qa_run_dir, tmp_path_factory) -> Path:
    rows = [{"prompt": f"What is {a} plus {b}?", "chosen": f"{a} plus {b} is {a + b}.", "rejected": f"{a} plus {b} is {a + b + 1}."}
            for a in range(2, 7) for b in range(3, 6)]
    where = tmp_path_factory.mktemp("dpo_from_sft")
    data = write_jsonl(where / "prefs.jsonl", rows)
    run_dir = where / "dpo"
    result = run_cpuft("dpo", "--model", qa_run_dir, "--dataset", data, "--output-dir", run_dir, "--max-steps", "2",
                       "--learning-rate", "5e-3", "--beta", "0.3", "--loss-type", "ipo", *DPO_FLAGS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"starting point: the SFT run {qa_run_dir}" in result.stdout
    return run_dir


def test_dpo_from_an_sft_run_starts_from_the_merged_sft_model(qa_run_dir, dpo_from_sft):
    summary = json.loads((dpo_from_sft / "summary.json").read_text())
    assert summary["preference"]["starting_point"] == str(qa_run_dir)
    assert (summary["preference"]["beta"], summary["preference"]["loss_type"]) == (0.3, "ipo")
    # The first step's reference is the SFT model itself: the policy starts equal to it, so the
    # logged reward (beta x log-ratio to the reference) is 0 before any update.
    first = json.loads((dpo_from_sft / "metrics.jsonl").read_text().splitlines()[0])
    assert abs(first["rewards/chosen"]) < 1e-6 and abs(first["rewards/rejected"]) < 1e-6


def test_cpufts_loading_of_a_dpo_run_from_an_sft_run_is_the_stacked_model(qa_model_dir, qa_run_dir, dpo_from_sft):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpuft.inference.loading import load_for_inference, resolve_source

    loaded = load_for_inference(resolve_source(str(dpo_from_sft)), dtype="fp32")
    # Stock PEFT, by hand: the SFT adapter merged into the base, then the DPO adapter on top.
    tokenizer = AutoTokenizer.from_pretrained(dpo_from_sft / "adapter")
    base = AutoModelForCausalLM.from_pretrained(qa_model_dir, dtype="float32")
    sft = PeftModel.from_pretrained(base, qa_run_dir / "adapter").merge_and_unload()
    stacked = PeftModel.from_pretrained(sft, dpo_from_sft / "adapter").eval()
    ids = torch.tensor([tokenizer("What is 3 plus 4?")["input_ids"]])
    with torch.no_grad():
        expected, got = stacked(ids).logits, loaded.model(ids).logits
        without_sft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qa_model_dir, dtype="float32"),
                                                dpo_from_sft / "adapter").eval()(ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert (without_sft - expected).abs().max().item() > 1e-3  # the SFT adapter matters: the check is not vacuous


def test_serve_refuses_a_stacked_dpo_adapter_among_several(qa_run_dir, dpo_from_sft):
    result = run_cpuft("serve", f"sft={qa_run_dir}", f"dpo={dpo_from_sft}", "--port", "0")
    assert result.returncode == 2 and "on top of the SFT run" in result.stderr, result.stderr[-2000:]


def test_the_plan_counts_pairs_and_precomputes_the_reference_when_the_run_repeats_its_rows(tiny_model_dir, pairs, tmp_path):
    one_pass = run_cpuft("dpo", "--model", tiny_model_dir, "--dataset", pairs[0], "--dry-run", "--max-steps", "2",
                         "--per-device-batch-size", "2", *DPO_FLAGS)
    assert one_pass.returncode == 0, one_pass.stderr[-2000:]
    assert "2 pair(s) = 4 sequences" in one_pass.stdout and "forward each step" in one_pass.stdout
    assert "reference log-probs: a forward each step" in one_pass.stdout
    repeated = run_cpuft("dpo", "--model", tiny_model_dir, "--dataset", pairs[0], "--dry-run", "--num-train-epochs", "3",
                         *DPO_FLAGS)
    assert repeated.returncode == 0, repeated.stderr[-2000:]
    assert "precomputed, one pass" in repeated.stdout and "passes over its rows 3.0 times" in repeated.stdout


@pytest.mark.parametrize("row, field", [
    ({"prompt": "Hi", "chosen": "Hello there."}, "rejected"),
    ({"prompt": "Hi", "chosen": "Same.", "rejected": "Same."}, "chosen equals rejected"),
    ({"prompt": "Hi", "chosen": 42, "rejected": "No."}, "chosen"),
    ({"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "robot", "content": "Beep."}],
      "rejected": [{"role": "assistant", "content": "No."}]}, "role"),
])
def test_malformed_preference_rows_are_refused_with_nothing_written(tiny_model_dir, tmp_path, row, field):
    good = {"prompt": "Hello?", "chosen": "Hello, how can I help?", "rejected": "Go away."}
    if isinstance(row["prompt"], list):  # the same format as the row under test
        good = {key: [{"role": "user" if key == "prompt" else "assistant", "content": text}] for key, text in good.items()}
    data = write_jsonl(tmp_path / "prefs.jsonl", [good, good, row])
    run_dir = tmp_path / "run"
    result = run_cpuft("dpo", "--model", tiny_model_dir, "--dataset", data, "--output-dir", run_dir, *DPO_FLAGS)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{data}:3" in result.stderr and field in result.stderr and "Traceback" not in result.stderr
    assert not run_dir.exists()


@pytest.mark.slow
def test_sigterm_then_resume_gives_the_uninterrupted_adapter(tiny_model_dir, pairs, dpo_run, tmp_path):
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "cpuft", "dpo", "--model", str(tiny_model_dir), "--dataset", str(pairs[0]),
            "--output-dir", str(run_dir), "--max-steps", "12", "--learning-rate", "2e-3", "--per-device-batch-size", "4",
            "--gradient-accumulation-steps", "1", "--save-steps", "4", *DPO_FLAGS]
    log = tmp_path / "log.txt"
    with open(log, "w") as out:
        process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 400
    while not (run_dir / "metrics.jsonl").is_file() or not (run_dir / "metrics.jsonl").read_text().strip():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=300) == 75, log.read_text()[-3000:]
    assert not (run_dir / "adapter").exists()
    resumed = run_cpuft("dpo", "--output-dir", run_dir, "--resume", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 12
    # lora_dropout 0 (and DPO turns model dropout off): the same machine gives the same adapter.
    assert max_abs_difference(run_dir / "adapter", dpo_run / "adapter") <= 1e-6


@pytest.mark.parametrize("flag, value", [("--packing", "true"), ("--loss-on", "all"), ("--dataset-format", "messages")])
def test_sft_only_keys_are_refused_by_name(tiny_model_dir, tmp_path, capsys, flag, value):
    from cpuft.cli import main

    run_dir = tmp_path / "run"
    assert main(["dpo", "--model", str(tiny_model_dir), "--dataset", "sample", "--output-dir", str(run_dir), flag, value]) == 2
    assert "is a cpuft sft key" in capsys.readouterr().err and not run_dir.exists()
