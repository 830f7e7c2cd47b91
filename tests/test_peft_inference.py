"""Every PEFT method `cpuft sft` trains is usable afterwards: generate, eval, merge and --int8.

Each method trains 2 steps once (module fixture, the real CLI in-process); then, per method:
`cpuft generate` prints stock PEFT's greedy reply, `cpuft eval` scores the rows exactly as stock
PEFT's logits do, `cpuft merge` gives a stock model with the adapter's logits (weight methods) or
exits 2 naming the method and the alternative (virtual-token methods), and `--int8` loads and
scores close to fp32. References come from stock transformers + PEFT only.

What the int8/nf4 paths do per method was measured (every int8 method x every PEFT method, and
nf4): all int8 methods work for all eight; nf4 fails inside PEFT for LoHa and LoKr (no 4-bit
layer; a state-dict error), so cpuft refuses that with exit 2 before loading.
"""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch

from cpuft.cli import main
from tests.conftest import write_jsonl
from tests.test_peft_methods import conversation_rows

pytestmark = pytest.mark.slow  # 8 trainings; tests/test_inference.py covers generate, eval, merge and --int8 on LoRA

WEIGHT_METHODS = ("lora", "loha", "lokr", "ia3", "adalora")
VIRTUAL_TOKEN_METHODS = ("prompt_tuning", "prefix_tuning", "p_tuning")
METHODS = WEIGHT_METHODS + VIRTUAL_TOKEN_METHODS
PROMPT = "the cat sat on"


def run_cli(*argv) -> tuple[int, str, str]:
    """`cpuft ARGV` in this process (no interpreter start-up per call): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from cpuft.testing.tiny_model import TinyModelSpec, build_tiny_model

    root = tmp_path_factory.mktemp("peft_inference")
    rows = conversation_rows(8)
    texts = [" ".join(m["content"] for m in row["messages"]) for row in rows] * 8
    model = build_tiny_model(root / "tiny", texts=texts, spec=TinyModelSpec(
        vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128))
    return root, model, write_jsonl(root / "data.jsonl", rows), rows


@pytest.fixture(scope="module")
def runs(setup) -> dict:
    """method -> run directory of a finished 2-step `cpuft sft`."""
    root, model, data, _ = setup
    done = {}
    for method in METHODS:
        run_dir = root / f"run-{method}"
        code, _, err = run_cli(
            "sft", "--model", model, "--dataset", data, "--output-dir", run_dir, "--peft-method", method,
            "--max-steps", "2", "--per-device-batch-size", "4", "--gradient-accumulation-steps", "1",
            "--max-length", "64", "--eval-fraction", "0", "--learning-rate", "5e-2", "--warmup-steps", "0",
            "--num-virtual-tokens", "4", "--lora-r", "4", "--save-steps", "100", "--device", "cpu",
            "--dtype", "fp32", "--no-progress",
        )
        assert code == 0, (method, err[-3000:])
        done[method] = run_dir
    return done


def stock_peft(model_dir, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                     str(adapter_dir)).eval()


def stock_loss(model, tokenizer, rows) -> float:
    """Token-weighted mean next-token loss from stock PEFT logits, one row at a time (no padding).

    Prompt and p-tuning put virtual tokens before the row: the last of them predicts the row's
    first token, which PEFT's own loss also counts (test_virtual_token_loss_counts_the_first_token).
    """
    total, count = 0.0, 0
    for row in rows:
        ids = torch.tensor([tokenizer.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]])
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()
        virtual = logits.shape[1] - ids.shape[1]
        predicted, targets = (logits[0, virtual - 1:-1], ids[0]) if virtual else (logits[0, :-1], ids[0, 1:])
        total += torch.nn.functional.cross_entropy(predicted, targets, reduction="sum").item()
        count += targets.numel()
    return total / count


@pytest.mark.parametrize("method", METHODS)
def test_generate_prints_stock_peft_greedy_reply(method, runs, setup):
    from transformers import AutoTokenizer

    _, model_dir, _, _ = setup
    code, out, err = run_cli("generate", "--model", runs[method], "--dtype", "fp32", "--raw", "--max-new-tokens", "6", PROMPT)
    assert code == 0, err[-3000:]
    assert "+ adapter" in err

    tokenizer = AutoTokenizer.from_pretrained(runs[method] / "adapter")
    reference = stock_peft(model_dir, runs[method] / "adapter")
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        generated = reference.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected, "the reference reply is empty: nothing to compare"
    assert out == expected + "\n"


@pytest.mark.parametrize("method", METHODS)
def test_eval_loss_is_stock_peft_loss(method, runs, setup, tmp_path):
    from transformers import AutoTokenizer

    _, model_dir, data, rows = setup
    code, out, err = run_cli("eval", "--model", runs[method], "--dataset", data, "--eval-fraction", "1", "--dtype", "fp32",
                             "--generations", "1", "--max-new-tokens", "4", "--no-progress", "--out", tmp_path / "eval")
    assert code == 0, err[-3000:]
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["scored"] == "all tokens" and report["rows"] == len(rows)
    assert math.isfinite(report["loss"])
    tokenizer = AutoTokenizer.from_pretrained(runs[method] / "adapter")
    expected = stock_loss(stock_peft(model_dir, runs[method] / "adapter"), tokenizer, rows)
    assert report["loss"] == pytest.approx(expected, abs=1e-5)


def test_virtual_token_loss_counts_the_first_token(runs, setup):
    """The convention stock_loss uses for virtual tokens is PEFT's own: its loss with labels."""
    from transformers import AutoTokenizer

    _, model_dir, _, rows = setup
    model = stock_peft(model_dir, runs["prompt_tuning"] / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(runs["prompt_tuning"] / "adapter")
    ids = torch.tensor([tokenizer.apply_chat_template(rows[0]["messages"], tokenize=True, return_dict=True)["input_ids"]])
    with torch.inference_mode():
        peft_loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.item()
    assert stock_loss(model, tokenizer, rows[:1]) == pytest.approx(peft_loss, abs=1e-6)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_merged_model_has_the_adapters_logits(method, runs, setup, tmp_path):
    from transformers import AutoModelForCausalLM

    _, model_dir, _, _ = setup
    code, out, err = run_cli("merge", runs[method], "--out", tmp_path / "merged")
    assert code == 0, err[-3000:]
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    unmerged = stock_peft(model_dir, runs[method] / "adapter")
    base = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 11, 60]])
    with torch.inference_mode():
        got, expected, unadapted = merged(input_ids=ids).logits, unmerged(input_ids=ids).logits, base(input_ids=ids).logits
    assert (got - expected).abs().max().item() <= 1e-4
    assert (unadapted - expected).abs().max().item() > 1e-3  # the adapter did change the model


@pytest.mark.parametrize("method", VIRTUAL_TOKEN_METHODS)
def test_merge_refuses_virtual_token_adapters_and_names_the_alternative(method, runs, tmp_path):
    code, out, err = run_cli("merge", runs[method], "--out", tmp_path / "merged")
    assert code == 2
    assert f"is {method}" in err and "nothing to merge" in err
    assert "cpuft generate --model" in err and "serve" in err
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("method", METHODS)
def test_int8_loads_every_method_and_scores_close_to_fp32(method, runs, setup):
    """The default --int8 path (torch-dynamic): weight adapters merged then quantised; virtual-token
    adapters kept, the base quantised under them and the prompt encoder left in fp32."""
    from cpuft.inference.generate import GenerationSettings, generate
    from cpuft.inference.loading import load_for_inference, resolve_source

    _, model_dir, _, rows = setup
    loaded = load_for_inference(resolve_source(str(runs[method])), int8="torch-dynamic")
    assert loaded.precision == "int8 (torch-dynamic, fp32 activations)"
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    def float_and_int8_linears(module) -> tuple[int, int]:
        layers = list(module.modules())
        return sum(type(m) is torch.nn.Linear for m in layers), sum(isinstance(m, DynamicInt8Linear) for m in layers)

    if method in VIRTUAL_TOKEN_METHODS:
        assert type(loaded.model).__name__ == "PeftModelForCausalLM"
        assert loaded.notes and f"{method} adapter kept unmerged" in loaded.notes[0]
        float_layers, int8_layers = float_and_int8_linears(loaded.model.get_base_model())
        assert float_layers == 0 and int8_layers == 2 * 7 + 1  # 7 per layer + lm_head
        assert float_and_int8_linears(loaded.model.prompt_encoder)[1] == 0  # the virtual tokens stay float
    else:
        assert float_and_int8_linears(loaded.model) == (0, 2 * 7 + 1)  # merged, then every linear int8
    tokenizer = loaded.tokenizer
    fp32 = stock_loss(stock_peft(model_dir, runs[method] / "adapter"), tokenizer, rows)
    assert stock_loss(loaded.model, tokenizer, rows) == pytest.approx(fp32, rel=0.02)
    assert isinstance(generate(loaded, GenerationSettings(max_new_tokens=3), text=PROMPT), str)


@pytest.mark.parametrize("method", ("loha", "lokr"))
def test_nf4_refuses_loha_and_lokr_before_loading(method, runs):
    pytest.importorskip("bitsandbytes")
    code, out, err = run_cli("generate", "--model", runs[method], "--nf4", "--device", "cpu", PROMPT)
    assert code == 2
    assert f"is {method}, which PEFT cannot put on 4-bit (--nf4) layers" in err
    assert "Traceback" not in err
