"""`cpuft sft` and `cpuft env` end to end, through the real CLI in a subprocess, on the tiny model."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

import cpuft
from tests.conftest import run_cpuft, write_jsonl

FAST = ["--per-device-batch-size", "4", "--gradient-accumulation-steps", "1", "--max-length", "128", "--no-progress"]


@pytest.fixture(scope="module")
def trained_run(tiny_model_dir, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("runs") / "demo"
    result = run_cpuft(
        "sft", "--model", tiny_model_dir, "--dataset", "sample", "--max-steps", "30",
        "--learning-rate", "1e-2", "--save-steps", "10", "--output-dir", run_dir, *FAST,
        # All tokens: in 30 steps the random 64-wide model learns the template's structure tokens,
        # while on the replies alone its loss fell only ~0.03 (test_loss_falls_over_the_run);
        # the default, assistant-only loss, is checked by the tests at the end of this file.
        "--loss-on", "all",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_run_directory_holds_every_artefact(trained_run):
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja", "config.yaml", "plan.json", "metrics.jsonl", "loss_curve.png",
                 "summary.json", "checkpoint-30"):
        assert (trained_run / name).exists(), name
    assert any((trained_run / "tensorboard").rglob("events.out.tfevents.*"))
    assert not list(trained_run.glob(".*tmp*")), "temporary files left behind"


def test_summary_figures_are_plausible(trained_run):
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == summary["max_steps"] == 30
    assert summary["device"] == "cpu"
    sample_rows = len((Path(cpuft.__file__).parent / "data" / "lima_sample.jsonl").read_text().splitlines())
    assert summary["train_rows"] + summary["eval_rows"] == sample_rows and summary["eval_rows"] > 0
    assert summary["train_tokens"] > 0 and summary["train_tokens_per_second"] > 0
    assert summary["peak_rss_bytes"] > 50 * 2**20
    assert 0 < summary["mfu"] < 1
    # LoRA r=16 on every linear layer but the head: r * (in + out) per layer. Per block of the
    # test model (hidden 64, 2 of 4 heads for k/v so 32 wide, MLP 192): q, o 64->64; k, v 64->32;
    # gate, up 64->192; down 192->64. 16 * (2*128 + 2*96 + 3*256) = 19,456; two blocks.
    assert summary["trainable_params"] == 2 * 19_456
    assert summary["trainable_params"] < summary["total_params"]
    assert summary["wall_seconds"] >= summary["train_seconds"] > 0


@pytest.mark.slow
def test_trained_tokens_are_the_non_padding_tokens_of_the_data(tiny_model_dir, tmp_path):
    """train_tokens counted here from the dataset: every row through the chat template, cut at
    max_length; 4 steps of 4 rows over 8 rows are exactly two epochs."""
    from transformers import AutoTokenizer

    rows = [{"messages": [{"role": "user", "content": f"Question {i}: " + "why is the sky blue? " * (i * i)},
                          {"role": "assistant", "content": "Because of Rayleigh scattering. " * (i + 1)}]}
            for i in range(8)]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    run_dir = tmp_path / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", data, "--eval-fraction", "0",
                       "--max-steps", "4", "--per-device-batch-size", "4", "--gradient-accumulation-steps", "1",
                       "--max-length", "64", "--save-steps", "100", "--output-dir", run_dir, "--no-progress",
                       "--loss-on", "all")  # with assistant-only loss TRL drops rows whose prompt fills max_length
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    lengths = [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"])
               for r in rows]
    assert min(lengths) < 64 < max(lengths), "the rows should exercise both sides of truncation"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["train_rows"] == 8
    assert summary["train_tokens"] == 2 * sum(min(n, 64) for n in lengths)
    assert summary["loss_counted"] == "all tokens"
    mask = summary["loss_mask"]
    assert mask["loss_tokens"] == mask["tokens"] == sum(min(n, 64) for n in lengths)
    assert mask["truncated_conversations"] == sum(n > 64 for n in lengths)
    logged = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert logged == [1, 2, 3, 4]
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_loss_falls_over_the_run(trained_run):
    logged = [r for r in map(json.loads, (trained_run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in logged] == list(range(1, 31))  # logging_steps defaults to 1
    losses = [r["loss"] for r in logged]
    # The 64-wide random test model with frozen tied embeddings can only shift logits a little
    # (RMSNorm bounds the hidden state), so the drop is modest; step-to-step noise is ~0.03.
    start = statistics.mean(losses[:5])
    assert statistics.mean(losses[-5:]) < start - 0.05
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["eval_loss"] < start


def test_plan_json_records_machine_and_plan(trained_run):
    plan = json.loads((trained_run / "plan.json").read_text())
    assert plan["plan"]["device"] == "cpu"
    assert plan["plan"]["per_device_batch_size"] == 4 and plan["plan"]["gradient_accumulation_steps"] == 1
    assert plan["machine"]["physical_cores"] >= 1


def test_adapter_loads_in_stock_peft_and_generates(trained_run, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained_run / "adapter")
    model = PeftModel.from_pretrained(base, trained_run / "adapter")
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "How do I water tomatoes?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        adapted = model(**inputs).logits
        with model.disable_adapter():
            plain = model(**inputs).logits
    assert out.shape[1] > inputs["input_ids"].shape[1]
    assert not torch.allclose(adapted, plain), "the adapter changes nothing"


def test_existing_run_is_not_overwritten(trained_run, tiny_model_dir):
    before = (trained_run / "summary.json").read_bytes()
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--output-dir", trained_run, "--max-steps", "2")
    assert result.returncode == 2
    assert "already holds files" in result.stderr and "--resume" in result.stderr
    assert (trained_run / "summary.json").read_bytes() == before


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--dataset", "{tmp}/missing.jsonl"], "does not exist"),
        (["--dataset", "{tmp}/bad.jsonl"], "bad.jsonl:2: field 'messages[1]'.role is 'robot'"),
        (["--config", "{tmp}/job.yaml"], "unknown config key 'lora_rank'. Did you mean 'lora_r'?"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--model", "{tmp}/no-model"], "cannot load model config"),
    ],
)
def test_bad_input_exits_2_with_a_message_and_writes_nothing(tmp_path, tiny_model_dir, extra, fragment):
    write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]},
    ])
    (tmp_path / "job.yaml").write_text("max_steps: 3\nlora_rank: 8\n")
    args = ["sft", "--model", str(tiny_model_dir), "--dataset", "sample", "--output-dir", str(tmp_path / "out")]
    args += [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = run_cpuft(*args)
    assert result.returncode == 2, result.stderr[-2000:]
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_plans_without_writing(tmp_path, tiny_model_dir):
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", "sample", "--output-dir", tmp_path / "out", "--dry-run")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "compute_dtype" in result.stdout and "dry run" in result.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_finishes(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cpuft", "sft", "--model", str(tiny_model_dir), "--dataset", "sample",
         "--max-steps", "400", "--save-steps", "1000", "--output-dir", str(run_dir), *FAST],
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
    assert (run_dir / f"checkpoint-{stopped_at}").is_dir()
    assert not (run_dir / "adapter").exists()

    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--max-steps", str(stopped_at + 3), "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["steps"] == stopped_at + 3 and summary["steps_this_run"] == 3
    steps = [r["step"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == list(range(1, stopped_at + 4)), "each step logged exactly once across the two processes"
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_keeps_the_dtype_the_run_trained_in(trained_run, tmp_path):
    """`--dtype auto` resumed: the run goes on in the dtype of its plan.json (here rewritten to the
    other one, as if a busier moment's timing had picked it), where this CPU runs it natively."""
    import shutil

    from cpuft.hardware.probe import probe_machine

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    header = json.loads((run_dir / "plan.json").read_text())
    first = header["plan"]["compute_dtype"]
    other = "fp32" if first == "bf16" else "bf16"
    header["plan"]["compute_dtype"] = other
    (run_dir / "plan.json").write_text(json.dumps(header))

    result = run_cpuft("sft", "--output-dir", run_dir, "--resume", "--max-steps", "32", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads((run_dir / "plan.json").read_text())["plan"]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 32
    if other == "fp32" or probe_machine().native_bf16:
        assert plan["compute_dtype"] == other
        assert plan["reasons"]["compute_dtype"].startswith(f"resume: {other}, the dtype the run trained in so far")
    else:  # bf16 is emulated on this CPU: the plan's fp32 stands
        assert plan["compute_dtype"] == "fp32" and not plan["reasons"]["compute_dtype"].startswith("resume:")


def test_resume_without_a_run_directory_is_bad_input(tmp_path):
    result = run_cpuft("sft", "--output-dir", tmp_path / "nothing", "--resume")
    assert result.returncode == 2 and "not a cpuft run directory" in result.stderr


def test_env_plans_for_a_described_machine(tmp_path):
    machine = {"machine": {"cpu_name": "Xeon", "cpu_flags": ["amx_bf16", "avx512_bf16", "avx512_f", "avx2"],
                           "physical_cores": 44, "logical_cores": 88, "usable_cpus": 88, "cpu_max_mhz": 3000}}
    (tmp_path / "c3.json").write_text(json.dumps(machine))
    result = run_cpuft("env", "--machine", tmp_path / "c3.json")
    assert result.returncode == 0, result.stderr
    assert "bf16" in result.stdout and "AMX" in result.stdout and "44" in result.stdout


# Two conversations, one with a system turn, one with two replies (issue 14: loss on the replies).
CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "Answer in one short sentence."},
                  {"role": "user", "content": "What is the capital of France?"},
                  {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"messages": [{"role": "user", "content": "Name a colour of the sky."},
                  {"role": "assistant", "content": "The sky is blue."},
                  {"role": "user", "content": "And at sunset?"},
                  {"role": "assistant", "content": "At sunset it turns orange and red."}]},
]
REPLIES = [m["content"] for row in CONVERSATIONS for m in row["messages"] if m["role"] == "assistant"]
TWO_ROW_RUN = ["--eval-fraction", "0", "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1",
               "--max-length", "128", "--save-steps", "100", "--no-progress"]


def chatml_reply_tokens(tokenizer) -> int:
    """By hand from the ChatML template (`<|im_start|>assistant\\n` + reply + `<|im_end|>\\n`): the
    loss counts each reply's own tokens and its <|im_end|>, nothing else."""
    return sum(len(tokenizer(reply, add_special_tokens=False)["input_ids"]) + 1 for reply in REPLIES)


@pytest.mark.slow
def test_loss_counts_the_assistant_replies_only(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    data = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", data, "--max-steps", "2",
                       "--output-dir", tmp_path / "run", *TWO_ROW_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokens = sum(len(tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in CONVERSATIONS)
    expected = chatml_reply_tokens(tokenizer)
    assert 0 < expected < tokens
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["loss_counted"] == "assistant tokens"
    assert summary["loss_mask"] == {
        "loss_on": "assistant", "conversations": 2, "tokens": tokens, "loss_tokens": expected,
        "loss_token_fraction": round(expected / tokens, 4), "conversations_without_loss_tokens": 0,
        "truncated_conversations": 0, "turns_without_end_token": 0,
    }
    assert f"loss on: assistant tokens ({expected} of {tokens} tokens" in result.stdout
    assert summary["train_tokens"] == 2 * tokens  # the model still reads the prompts: 2 steps of both rows


def test_the_trl_collator_gets_labels_only_on_the_replies(tiny_model_dir, tmp_path):
    """One batch from the trainer's own dataloader (TRL's collator): the labelled tokens, decoded,
    are exactly the replies each with its <|im_end|>; system and user turns and padding are -100."""
    from cpuft.config.job import resolve_config
    from cpuft.hardware.probe import probe_machine
    from cpuft.train.sft import build_trainer, prepare_run

    data = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    config = resolve_config(None, {"model": str(tiny_model_dir), "dataset": str(data), "max_steps": 1,
                                   "eval_fraction": 0.0, "per_device_batch_size": 2, "gradient_accumulation_steps": 1,
                                   "output_dir": str(tmp_path / "run")})
    run = prepare_run(config, probe_machine(), log=lambda *a, **k: None)
    trainer = build_trainer(run, callbacks=[])
    batch = next(iter(trainer.get_train_dataloader()))
    tokenizer = run.tokenizer
    spans = []
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        run = []
        for token, label in zip(ids, labels, strict=True):
            if label != -100:
                assert label == token
                run.append(token)
            elif run:
                spans.append(tokenizer.decode(run))
                run = []
        if run:
            spans.append(tokenizer.decode(run))
        untrained = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label == -100])
        assert "<|im_start|>assistant" in untrained and not any(reply in untrained for reply in REPLIES)
    assert sorted(spans) == sorted(reply + "<|im_end|>" for reply in REPLIES)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    """A tiny base model: a tokenizer without a chat template or any ChatML token, tied embeddings."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cpuft.testing.tiny_model import sample_texts, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(sample_texts(), 1024, ["<|endoftext|>"], pad_token="<|endoftext|>",
                                    eos_token="<|endoftext|>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("models") / "base"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
def test_base_model_without_chat_template_trains_its_new_tokens(base_model_dir, tmp_path):
    import torch
    from peft import AutoPeftModelForCausalLM
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    run_dir = tmp_path / "run"
    result = run_cpuft("sft", "--model", base_model_dir, "--dataset", data, "--max-steps", "3", "--warmup-steps", "0",
                       "--learning-rate", "5e-2", "--output-dir", run_dir, *TWO_ROW_RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "no chat template: using cpuft's default ChatML template, added 2 tokens" in result.stdout

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "adapter")  # the template travels with the adapter
    new_ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert new_ids == [1024, 1025] and tokenizer.eos_token == "<|im_end|>"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["loss_mask"]["loss_tokens"] == chatml_reply_tokens(tokenizer)
    assert summary["default_chat_template"]["trained_token_ids"] == new_ids

    # The adapter holds the two trained rows, not the whole resized embedding.
    weights = load_file(run_dir / "adapter" / "adapter_model.safetensors")
    [key] = [k for k in weights if "trainable_tokens" in k]
    trained = weights[key]
    assert trained.shape == (2, 64)
    # Stock PEFT reloads it: it resizes the base to the adapter's tokenizer, then applies the rows,
    # in the input embedding and in the tied output head alike.
    reloaded = AutoPeftModelForCausalLM.from_pretrained(run_dir / "adapter")
    ids = torch.tensor(new_ids)
    with torch.no_grad():
        assert torch.equal(reloaded.get_input_embeddings()(ids), trained)
        assert torch.equal(reloaded.get_output_embeddings().weight[ids], trained)
    # The rows the run started from: transformers' resize of the base, seeded with the run's seed.
    base = AutoModelForCausalLM.from_pretrained(base_model_dir)
    torch.manual_seed(42)
    base.resize_token_embeddings(len(tokenizer))
    initial = base.get_input_embeddings().weight[ids].detach()
    assert (trained - initial).abs().max() > 1e-3

    result = run_cpuft("generate", "--model", run_dir, "--max-new-tokens", "4", "What is the capital of France?")
    assert result.returncode == 0, result.stderr[-3000:]


def test_base_model_with_a_method_that_cannot_train_new_tokens_is_refused(base_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", CONVERSATIONS)
    result = run_cpuft("sft", "--model", base_model_dir, "--dataset", data, "--peft-method", "ia3",
                       "--output-dir", tmp_path / "run", *TWO_ROW_RUN)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "peft_method ia3 cannot train them" in result.stderr and "--peft-method lora" in result.stderr
    assert not (tmp_path / "run").exists()


def test_retired_assistant_only_loss_key_reads_as_loss_on(capsys):
    from cpuft.config.job import resolve_config
    from cpuft.errors import UserError

    assert resolve_config(None, {}).loss_on == "assistant"
    assert resolve_config(None, {"assistant_only_loss": True}).loss_on == "assistant"
    assert resolve_config(None, {"assistant_only_loss": False}).loss_on == "all"  # what runs before loss_on did
    assert "'assistant_only_loss' is retired (read as loss_on: all)" in capsys.readouterr().err
    assert resolve_config(None, {"assistant_only_loss": False, "loss_on": "assistant"}).loss_on == "assistant"
    with pytest.raises(UserError, match="--completion-only-loss: 'completion_only_loss' .* use 'loss_on' instead"):
        resolve_config(None, {"completion_only_loss": False})
    with pytest.raises(UserError, match="loss_on"):
        resolve_config(None, {"loss_on": "replies"})
