"""The architecture matrix: every family in cpuft.testing.architectures, tiny and random, through
the real CLI as a user runs it: `cpuft sft` 3 steps, the adapter in stock PEFT, `cpuft merge`
equal to base + adapter, `cpuft generate` (plain and --int8) and `cpuft plan`.

Per architecture two processes: `cpuft sft`, then one Python process that runs the other checks
(the CLI's own `main`, so the import cost is paid once) and prints a JSON verdict.
Seq2seq (T5, mT5) rows run in the full matrix only: tests/test_seq2seq.py checks T5 in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cpuft.testing.architectures import TINY_ARCHITECTURES, build_architecture
from tests.conftest import planned_tolerance, run_cpuft, write_jsonl

SEQ2SEQ = [name for name, arch in TINY_ARCHITECTURES.items() if arch.encoder_decoder]
# Each architecture costs ~20-40 s of CLI runs on 2 cores; CI runs them all, seq2seq included.
# CPUFT_QUICK_MATRIX=1 (for a quick local loop) keeps one per attention path: SDPA llama, eager
# gemma2; tests/test_seq2seq.py covers T5 in depth either way.
QUICK_ARCHITECTURES = ("llama", "gemma2")
TRAINED = list(TINY_ARCHITECTURES)
if os.environ.get("CPUFT_QUICK_MATRIX"):
    TRAINED = [name for name in TRAINED if name in QUICK_ARCHITECTURES]
# transformers 5.2's classes that do not set _supports_sdpa (the user report: Gemma 2's
# logit soft-capping, BLOOM's ALiBi); every other family here supports SDPA.
EAGER_ONLY = {"gemma2", "bloom"}
# Library messages a user cannot act on (cpuft/cli/__init__.py filters them): torchao's CUDA-only
# kernels, torch's pytree deprecation, bitsandbytes' optional Hub kernel, T5's untied head.
LIBRARY_NOISE = ("Failed to load", "register_constant", "kernels-community", "NOT tie")
ROWS = [
    {"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}]}
    for a in range(4) for b in range(3)
]
SFT_FLAGS = ["--max-steps", "3", "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1",
             "--max-length", "128", "--learning-rate", "5e-2", "--eval-fraction", "0", "--no-progress"]

CHECKS = r"""
import contextlib, io, json, sys
import torch
from peft import PeftModel
from transformers import AutoConfig
from cpuft.cli import main
from cpuft.planning.architecture import auto_model_class

base, run_dir, merged_dir = sys.argv[1:4]
verdict = {}
auto = auto_model_class(AutoConfig.from_pretrained(base))  # AutoModelForSeq2SeqLM for T5/mT5
ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
# An encoder-decoder reads `ids` in its encoder and scores them again as decoder inputs.
inputs = {"input_ids": ids, **({"decoder_input_ids": ids} if auto.__name__.endswith("Seq2SeqLM") else {})}
with torch.no_grad():
    base_logits = auto.from_pretrained(base).eval()(**inputs).logits
    peft_model = PeftModel.from_pretrained(auto.from_pretrained(base), run_dir + "/adapter").eval()
    adapter_logits = peft_model(**inputs).logits
verdict["adapter_changes_logits"] = (adapter_logits - base_logits).abs().max().item()
verdict["merge_rc"] = main(["merge", run_dir, "--out", merged_dir])
with torch.no_grad():
    merged_logits = auto.from_pretrained(merged_dir).eval()(**inputs).logits
verdict["merged_minus_adapter"] = (merged_logits - adapter_logits).abs().max().item()
for flags in ([], ["--int8"]):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["generate", "--model", run_dir, "--max-new-tokens", "4", *flags, "What is 1 plus 2?"])
    verdict["generate" + "".join(flags)] = [rc, out.getvalue()]
out = io.StringIO()
with contextlib.redirect_stdout(out):
    verdict["plan_rc"] = main(["plan", "--model", base, "--tokens", "10000", "--json"])
verdict["plan"] = json.loads(out.getvalue())
print("VERDICT " + json.dumps(verdict))
"""


@pytest.fixture(scope="module")
def rows_file(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("data") / "sums.jsonl", ROWS)


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_architecture_trains_merges_generates_and_plans(name, rows_file, tmp_path):
    base = build_architecture(name, tmp_path / "base")
    run_dir = tmp_path / "run"
    trained = run_cpuft("sft", "--model", base, "--dataset", rows_file, "--output-dir", run_dir, *SFT_FLAGS)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for noise in LIBRARY_NOISE:
        assert noise not in trained.stderr + trained.stdout, noise
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3
    expected_attention = "eager" if name in EAGER_ONLY else "sdpa"
    assert json.loads((run_dir / "plan.json").read_text())["plan"]["attn_implementation"] == expected_attention
    assert f"attn_implementation    {expected_attention}" in trained.stdout

    checked = subprocess.run(
        [sys.executable, "-c", CHECKS, str(base), str(run_dir), str(tmp_path / "merged")],
        capture_output=True, text=True, timeout=600,
    )
    assert checked.returncode == 0, checked.stderr[-3000:]
    verdict = json.loads(checked.stdout.split("VERDICT ", 1)[1])
    assert verdict["adapter_changes_logits"] > 1e-4  # 3 steps at lr 5e-2 moved the adapter
    assert verdict["merge_rc"] == 0
    dtype, tolerance = planned_tolerance(run_dir)  # bf16 where the CPU has AMX or AVX-512-BF16
    assert verdict["merged_minus_adapter"] < tolerance, dtype  # W + BA = base + adapter
    for key in ("generate", "generate--int8"):
        rc, text = verdict[key]
        assert rc == 0, (key, text)  # a random tiny model may well answer with its end-of-turn token
    assert verdict["plan_rc"] == 0
    plan = verdict["plan"]["plan"]
    assert plan["attn_implementation"] == expected_attention
    task = "SEQ_2_SEQ_LM" if TINY_ARCHITECTURES[name].encoder_decoder else "CAUSAL_LM"
    assert plan["target_modules"] == "all-linear" and plan["task_type"] == task
    assert verdict["plan"]["memory"]
    time_plan = verdict["plan"]["time"]
    if task == "CAUSAL_LM":  # measured at the model's shapes, not the FLOP-count fallback
        assert time_plan["step_costs"] is not None, time_plan.get("notes")


@pytest.mark.slow
@pytest.mark.parametrize("name", SEQ2SEQ)
def test_seq2seq_plan_names_the_seq2seq_class_and_task(name, tmp_path):
    base = build_architecture(name, tmp_path / "base")
    result = run_cpuft("plan", "--model", base, "--tokens", "10000", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout)["plan"]
    assert plan["task_type"] == "SEQ_2_SEQ_LM"
    assert plan["model_class"] in ("T5ForConditionalGeneration", "MT5ForConditionalGeneration")
    assert plan["attn_implementation"] in ("sdpa", "eager")


@pytest.mark.slow
def test_merge_refuses_a_prompt_tuning_adapter(rows_file, tmp_path):
    # Prompt tuning adds virtual tokens, not weight changes: nothing to fold into the weights.
    base = build_architecture("qwen2", tmp_path / "base")
    run_dir = tmp_path / "run"
    trained = run_cpuft("sft", "--model", base, "--dataset", rows_file, "--output-dir", run_dir,
                        "--peft-method", "prompt_tuning", *SFT_FLAGS)
    assert trained.returncode == 0, trained.stderr[-3000:]
    merged = run_cpuft("merge", run_dir, "--out", tmp_path / "merged")
    assert merged.returncode == 2
    assert "prompt_tuning" in merged.stderr.lower() and "unmerged" in merged.stderr and "Traceback" not in merged.stderr
    assert not (tmp_path / "merged").exists()
