"""Seq2seq (T5-family) fine-tuning through the same CLI: `cpuft sft` on a tiny random T5 with
TaskType.SEQ_2_SEQ_LM, its adapter in stock PEFT (AutoPeftModelForSeq2SeqLM), `merge`,
`generate` (plain and --int8), `chat`, `eval` and `--resume` after SIGTERM; and the prompt/target pairs
the real DataCollatorForSeq2Seq builds from cpuft's rows.
"""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time

import pytest

from cpuft.testing.architectures import build_architecture
from tests.conftest import planned_tolerance, run_cpuft, write_jsonl

ROWS = [{"prompt": f"What is {a} plus {b}?", "completion": f"{a} plus {b} is {a + b}."} for a in range(4) for b in range(4)]
FAST = ["--per-device-batch-size", "2", "--gradient-accumulation-steps", "1", "--max-length", "48",
        "--learning-rate", "5e-2", "--no-progress"]

CHECKS = r"""
import contextlib, io, json, sys
import torch
from peft import AutoPeftModelForSeq2SeqLM
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
from cpuft.cli import main

base, run_dir, merged_dir = sys.argv[1:4]
verdict = {}
tokenizer = AutoTokenizer.from_pretrained(run_dir + "/adapter")
enc = tokenizer("What is 1 plus 2?", return_tensors="pt")
labels = tokenizer(text_target="1 plus 2 is 3.", return_tensors="pt").input_ids
def logits(model):
    with torch.no_grad():
        return model.eval()(**enc, labels=labels).logits
peft_model = AutoPeftModelForSeq2SeqLM.from_pretrained(run_dir + "/adapter")
verdict["task_type"] = str(peft_model.peft_config["default"].task_type)
adapter_logits = logits(peft_model)
verdict["adapter_changes_logits"] = (adapter_logits - logits(AutoModelForSeq2SeqLM.from_pretrained(base))).abs().max().item()
verdict["merge_rc"] = main(["merge", run_dir, "--out", merged_dir])
verdict["merged_minus_adapter"] = (logits(AutoModelForSeq2SeqLM.from_pretrained(merged_dir)) - adapter_logits).abs().max().item()
for name, args in (("generate", ["--model", run_dir]), ("int8", ["--model", run_dir, "--int8"])):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["generate", *args, "--max-new-tokens", "5", "What is 1 plus 2?"])
    verdict[name] = [rc, out.getvalue()]
out, sys.stdin = io.StringIO(), io.StringIO("What is 1 plus 2?\n/exit\n")
with contextlib.redirect_stdout(out):
    verdict["chat"] = [main(["chat", "--model", run_dir, "--max-new-tokens", "5"]), out.getvalue()]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    verdict["eval_rc"] = main(["eval", "--model", run_dir, "--generations", "1", "--no-progress"])
print("VERDICT " + json.dumps(verdict))
"""


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return build_architecture("t5", tmp_path_factory.mktemp("models") / "t5")


def test_collator_labels_are_the_target_ids_with_padding_ignored(t5_dir):
    from transformers import (
        AutoModelForSeq2SeqLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
    )

    from cpuft.data.seq2seq import tokenize_pairs

    tokenizer = AutoTokenizer.from_pretrained(t5_dir)
    rows = [
        {"messages": [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "It is 3."}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, friend."},
                      {"role": "user", "content": "Sum 2 and 2?"}, {"role": "assistant", "content": "4"}]},
    ]
    model = AutoModelForSeq2SeqLM.from_pretrained(t5_dir)
    batch = DataCollatorForSeq2Seq(tokenizer, model=model)(tokenize_pairs(rows, tokenizer, max_length=64))

    # T5's tokenizer ends every text with </s> (id 1): the target ids are its own encoding.
    first, second = (tokenizer(text_target=t).input_ids for t in ("It is 3.", "4"))
    assert first[-1] == second[-1] == tokenizer.eos_token_id == 1
    assert batch["labels"][0].tolist() == first
    assert batch["labels"][1].tolist() == second + [-100] * (len(first) - len(second))
    # The decoder reads the labels shifted right, starting from <pad> (T5's decoder start).
    assert batch["decoder_input_ids"][0].tolist() == [0] + first[:-1]
    # One user turn is the prompt as it is; a longer conversation, "role: content" lines.
    assert batch["input_ids"][0].tolist()[: batch["attention_mask"][0].sum()] == tokenizer("What is 1 plus 2?").input_ids
    second_prompt = tokenizer("user: Hi\nassistant: Hello there, friend.\nuser: Sum 2 and 2?").input_ids
    assert batch["input_ids"][1].tolist()[: batch["attention_mask"][1].sum()] == second_prompt


@pytest.mark.slow
def test_sft_trains_a_t5_adapter_that_stock_peft_merge_generate_and_eval_use(t5_dir, tmp_path):
    data = write_jsonl(tmp_path / "sums.jsonl", ROWS)
    run_dir = tmp_path / "run"
    trained = run_cpuft("sft", "--model", t5_dir, "--dataset", data, "--output-dir", run_dir, "--max-steps", "3",
                        "--eval-fraction", "0.05", *FAST)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "task_type              SEQ_2_SEQ_LM" in trained.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    losses = [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert summary["train_tokens"] > 0  # prompt + target tokens, logged as num_tokens
    adapter_config = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["task_type"] == "SEQ_2_SEQ_LM" and adapter_config["peft_type"] == "LORA"

    checked = subprocess.run([sys.executable, "-c", CHECKS, str(t5_dir), str(run_dir), str(tmp_path / "merged")],
                             capture_output=True, text=True, timeout=600)
    assert checked.returncode == 0, checked.stderr[-3000:]
    verdict = json.loads(checked.stdout.split("VERDICT ", 1)[1])
    assert verdict["task_type"].endswith("SEQ_2_SEQ_LM")
    assert verdict["adapter_changes_logits"] > 1e-4  # 3 steps at lr 5e-2 moved the adapter
    dtype, tolerance = planned_tolerance(run_dir)  # bf16 where the CPU has AMX or AVX-512-BF16
    assert verdict["merge_rc"] == 0 and verdict["merged_minus_adapter"] <= tolerance, dtype
    for name in ("generate", "int8"):
        rc, text = verdict[name]
        # The encoder-decoder's reply alone: a random model writes some of its 5 new tokens, never the prompt.
        assert rc == 0 and text.strip() and "What is 1 plus 2?" not in text, (name, text)
    rc, text = verdict["chat"]  # the history is formatted by the template saved with the adapter
    assert rc == 0 and text.startswith("assistant> ") and text.removeprefix("assistant> ").strip(), text
    assert verdict["eval_rc"] == 0
    scored = json.loads((run_dir / "eval" / "eval.json").read_text())
    # 16 rows x 0.05 holds out one row, scored alone by both: `cpuft eval` = the Seq2SeqTrainer's eval loss.
    assert scored["rows"] == 1 and abs(scored["loss"] - summary["eval_loss"]) < tolerance, dtype


def test_plain_text_rows_are_refused_for_seq2seq(t5_dir, tmp_path, capsys):
    # The CLI's own entry point in this process: its exit code, without paying the imports again.
    from cpuft.cli import main

    data = write_jsonl(tmp_path / "plain.jsonl", [{"text": "Once upon a time."}] * 4)
    assert main(["sft", "--model", str(t5_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "out"),
                 "--max-steps", "1", "--no-progress"]) == 2
    stderr = capsys.readouterr().err
    assert str(data) in stderr and "prompt and target" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_lima_sample_sigterm_checkpoints_and_resume_finishes(t5_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpuft", "sft", "--model", str(t5_dir), "--dataset", "sample", "--max-samples", "40",
         "--max-steps", "400", "--save-steps", "1000", "--eval-fraction", "0", "--output-dir", str(run_dir), *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    stopped_at = summary["steps"]
    assert summary["status"] == "interrupted" and 2 <= stopped_at < 400
    assert (run_dir / f"checkpoint-{stopped_at}").is_dir() and not (run_dir / "adapter").exists()

    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--max-steps", str(stopped_at + 2), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == stopped_at + 2
    records = [r for r in map(json.loads, metrics.read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, stopped_at + 3)), "each step logged once across both runs"
    assert all(math.isfinite(r["loss"]) for r in records)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
