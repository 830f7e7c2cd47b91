"""`cpuft generate`, `cpuft chat`, `cpuft eval` and cpuft.inference on a real (tiny) fine-tune.

One LoRA run (`qa_run_dir`, conftest) is shared with test_merge.py. The CLI is exercised where the
behaviour is the CLI's (streaming chat, exit codes, files written); the rest runs in-process.
INT8 runs under the dtype cpuft plans on each CPU kind, with synthetic machines standing in for
the CPUs this one is not (bf16 is emulated here: slow, but the same code path).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from cpuft.errors import UserError
from cpuft.hardware.probe import Machine
from cpuft.inference.evaluate import evaluate_loss
from cpuft.inference.generate import GenerationSettings, generate, stream
from cpuft.inference.int8 import available_int8_methods
from cpuft.inference.loading import load_for_inference, resolve_source
from tests.conftest import qa_rows, run_cpuft

AVAILABLE_INT8 = [m for m, missing in available_int8_methods().items() if missing is None]
# CPU kinds by their flags, and the dtype cpuft must plan on each: bf16 only where the CPU computes
# it natively (AMX or AVX-512-BF16; FACTS.md: emulated bf16 on AVX2 measured 2.5-3x slower).
SYNTHETIC_CPUS = {
    "amx": ({"avx2", "fma3", "avx512_f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "amx_tile"}, "bf16"),
    "avx512_bf16": ({"avx2", "fma3", "avx512_f", "avx512_vnni", "avx512_bf16"}, "bf16"),
    "avx512": ({"avx2", "fma3", "avx512_f", "avx512_vnni"}, "fp32"),
    "avx2": ({"avx2", "fma3"}, "fp32"),
}


def synthetic_machine(flags: set[str]) -> Machine:
    return Machine(cpu_name="synthetic", cpu_flags=frozenset(flags), physical_cores=2, logical_cores=2,
                   usable_cpus=2, ram_bytes=16 * 2**30)


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
    # The run trained (and its trainer evaluated) the replies only, the default --loss-on assistant.
    result = run_cpuft("eval", "--model", qa_run_dir, "--assistant-only", "--generations", "3", "--max-new-tokens", "8", "--no-progress")
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads((qa_run_dir / "eval" / "eval.json").read_text())
    trainer_eval_loss = json.loads((qa_run_dir / "summary.json").read_text())["eval_loss"]
    # Same held-out rows (the run's dataset, fraction and seed), same tokenisation, one batch.
    assert report["loss"] == pytest.approx(trainer_eval_loss, rel=1e-4)
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


@pytest.fixture(scope="module")
def qa_eval_rows(qa_dataset):
    from cpuft.data.prepare import prepare_dataset

    return list(prepare_dataset(str(qa_dataset), eval_fraction=0.0).train)


@pytest.fixture(scope="module")
def adapter_loss(qa_run_dir, qa_eval_rows):
    """fp32 base + unmerged adapter: the reference every other load is compared with."""
    return evaluate_loss(*_model_and_tokenizer(load_for_inference(resolve_source(str(qa_run_dir)))), qa_eval_rows, batch_size=8)


def test_merged_load_scores_the_same_as_the_adapter(qa_run_dir, qa_eval_rows, adapter_loss):
    merged = evaluate_loss(*_model_and_tokenizer(load_for_inference(resolve_source(str(qa_run_dir)), merge=True)),
                           qa_eval_rows, batch_size=8)
    assert merged.tokens == adapter_loss.tokens
    assert merged.loss == pytest.approx(adapter_loss.loss, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", SYNTHETIC_CPUS)
def test_int8_runs_under_the_dtype_planned_for_each_cpu_kind(kind, qa_run_dir, qa_eval_rows, adapter_loss):
    """`--int8` (the kind's default method) and every other --int8-method load, score, generate and
    stream under the dtype the plan picks on this CPU kind: the path `cpuft generate|chat|eval
    --int8` takes on that CPU."""
    import torch

    from cpuft.cli import build_parser
    from cpuft.cli.infer import load_model_from_args
    from cpuft.inference.int8 import default_int8_method

    flags, planned = SYNTHETIC_CPUS[kind]
    machine = synthetic_machine(flags)
    default = default_int8_method(machine)
    for method in [None] + [m for m in AVAILABLE_INT8 if m != default]:
        argv = ["eval", "--model", str(qa_run_dir)] + (["--int8-method", method] if method else ["--int8"])
        loaded = load_model_from_args(build_parser().parse_args(argv), quiet=True, machine=machine)
        chosen = method or default
        # fbgemm's int8 linear (torch-dynamic) quantises fp32 activations only; the others take bf16.
        runs_in = "fp32" if chosen == "torch-dynamic" else planned
        assert loaded.precision == f"int8 ({chosen}, {runs_in} activations)", (kind, chosen)
        embedding_dtype = loaded.model.get_input_embeddings().weight.dtype
        assert embedding_dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[runs_in], (kind, chosen)
        if runs_in != planned:
            assert len(loaded.notes) == 1 and f"runs in {runs_in}, not {planned}" in loaded.notes[0]
        else:
            assert loaded.notes == []
        # int8 (and bf16) rounding moves the loss a little; a broken path (wrong scales, lost
        # adapter, a dtype cast in the wrong place) moves it a lot.
        loss = evaluate_loss(loaded.model, loaded.tokenizer, qa_eval_rows, batch_size=8).loss
        assert loss == pytest.approx(adapter_loss.loss, rel=0.02), (kind, chosen)
        settings, prompt = GenerationSettings(max_new_tokens=4), [{"role": "user", "content": "What is 2 plus 3?"}]
        reply = generate(loaded, settings, messages=prompt)
        assert "".join(stream(loaded, settings, messages=prompt)) == reply  # the chat path, same greedy tokens


@pytest.mark.slow
def test_cli_int8_with_bf16_requested_runs_in_fp32_and_says_why(qa_run_dir, tmp_path):
    # On this AVX2 CPU --dtype bf16 forces the bf16 the plan picks on AMX / AVX-512-BF16 CPUs;
    # before the fix it ended in "expected scalar type Float but found BFloat16".
    prompt = "What is the capital of Peru?"
    result = run_cpuft("generate", "--model", qa_run_dir, "--dtype", "bf16", "--int8", "--max-new-tokens", "4", prompt)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "int8 (torch-dynamic, fp32 activations)" in result.stderr
    assert "note: torch-dynamic runs in fp32, not bf16" in result.stderr
    # ... and what runs is exactly the fp32 int8 model: the same greedy reply.
    fp32_int8 = load_for_inference(resolve_source(str(qa_run_dir)), dtype="fp32", int8="torch-dynamic")
    expected = generate(fp32_int8, GenerationSettings(max_new_tokens=4), messages=[{"role": "user", "content": prompt}])
    assert result.stdout == expected + "\n"

    out = tmp_path / "eval"
    result = run_cpuft("eval", "--model", qa_run_dir, "--assistant-only", "--dtype", "bf16", "--int8", "--generations", "1",
                       "--max-new-tokens", "4", "--no-progress", "--out", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "eval.json").read_text())
    assert report["precision"] == "int8 (torch-dynamic, fp32 activations)"
    trainer_eval_loss = json.loads((qa_run_dir / "summary.json").read_text())["eval_loss"]
    assert report["loss"] == pytest.approx(trainer_eval_loss, rel=0.02)


# ----------------------------------------------------------------------------- the evaluator on hand-computed cases


class CharTokenizer:
    """'a'..'z' -> 0..25, one token per letter; 'z' doubles as padding."""

    pad_token_id = 25

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) - ord("a") for c in text]}


class NextLetterModel:
    """Logit ln(75) on the letter after the input letter (mod 26), 0 on the 25 others: the next
    letter gets probability 75/100, every other letter 1/100."""

    VOCAB = 26

    def __init__(self):
        import torch

        self.weight = torch.nn.Parameter(torch.zeros(1))

    def parameters(self):
        yield self.weight

    def __call__(self, input_ids, attention_mask=None):
        import torch

        logits = torch.zeros(*input_ids.shape, self.VOCAB)
        logits.scatter_(-1, ((input_ids + 1) % self.VOCAB).unsqueeze(-1), math.log(75))
        return SimpleNamespace(logits=logits)


def test_loss_is_the_token_weighted_mean_over_rows_of_different_lengths():
    # "abcd": 3 predicted letters, all the next letter; "abca": 2 next letters, then 'a' after 'c';
    # "ab": 1. Seven scored tokens: six at -ln(3/4), one at -ln(1/100). Batches of 2 pad "abca"
    # and "ab" together; the padding must not count.
    rows = [{"text": "abcd"}, {"text": "abca"}, {"text": "ab"}]
    result = evaluate_loss(NextLetterModel(), CharTokenizer(), rows, batch_size=2)
    assert result.tokens == 7 and result.rows == 3
    assert result.loss == pytest.approx((6 * math.log(4 / 3) + math.log(100)) / 7, rel=1e-6)
    assert result.perplexity == pytest.approx(((4 / 3) ** 6 * 100) ** (1 / 7), rel=1e-6)  # about 2.4706
    assert result.perplexity == pytest.approx(2.4706, abs=1e-4)


def test_uniform_logits_give_loss_ln_vocabulary(qa_model_dir, qa_eval_rows):
    # A zeroed output head makes every logit 0: each of the V tokens gets 1/V, whatever the input.
    import torch

    loaded = load_for_inference(resolve_source(str(qa_model_dir)))
    with torch.no_grad():
        loaded.model.lm_head.weight.zero_()
    vocabulary = loaded.model.config.vocab_size  # the width of the output head
    result = evaluate_loss(loaded.model, loaded.tokenizer, qa_eval_rows[:8], batch_size=3)
    assert result.loss == pytest.approx(math.log(vocabulary), rel=1e-6)
    assert result.perplexity == pytest.approx(vocabulary, rel=1e-5)


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


# ----------------------------------------------------------------------------- which tokens end a reply


def test_stop_ids_are_eos_generation_config_ids_and_the_templates_end_of_turn(tiny_model_dir):
    from transformers import AutoTokenizer, GenerationConfig

    from cpuft.inference.generate import stop_token_ids

    # A Qwen-like base: eos_token is <|endoftext|>, while the chat template ends turns with <|im_end|>.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.add_special_tokens({"eos_token": "<|endoftext|>"})
    model = SimpleNamespace(generation_config=GenerationConfig(eos_token_id=[7, 9]))
    vocabulary = tokenizer.get_vocab()
    assert stop_token_ids(tokenizer, model) == (vocabulary["<|endoftext|>"], 7, 9, vocabulary["<|im_end|>"])
    tokenizer.chat_template = None  # no template: no end-of-turn token is assumed
    assert stop_token_ids(tokenizer, model) == (vocabulary["<|endoftext|>"], 7, 9)


def test_generate_stream_and_serve_stop_on_every_generation_config_eos_id(tiny_model_dir, tmp_path):
    """A model whose generation_config lists two eos ids: cpuft generate, the chat stream and the
    server all end the reply at the second one, not only at the tokenizer's EOS."""
    import asyncio

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cpuft.serve.engine import Completion, Engine

    model_dir = tmp_path / "two-eos"
    shutil.copytree(tiny_model_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompt = "Once upon a time"
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.inference_mode():  # the unstopped greedy continuation, from stock transformers
        free = AutoModelForCausalLM.from_pretrained(model_dir).generate(
            **inputs, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    new = free[0, inputs["input_ids"].shape[1]:].tolist()
    # A random tiny model repeats one token; making the first one the second eos id ends the reply
    # at once, where stopping on the tokenizer's EOS alone would print all 8.
    assert len(new) == 8 and new[0] not in tokenizer.all_special_ids
    config = json.loads((model_dir / "generation_config.json").read_text())
    config["eos_token_id"] = [tokenizer.eos_token_id, new[0]]
    (model_dir / "generation_config.json").write_text(json.dumps(config))
    expected = ""

    result = run_cpuft("generate", "--model", model_dir, "--dtype", "fp32", "--raw", "--max-new-tokens", "8", prompt)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout == expected + "\n"

    loaded = load_for_inference(resolve_source(str(model_dir)))
    settings = GenerationSettings(max_new_tokens=8)
    assert "".join(stream(loaded, settings, text=prompt)) == expected

    async def serve_once():
        engine = Engine(loaded, max_batch_size=1, max_queue=1)
        engine.start()
        try:
            return await engine.submit(Completion(prompt_ids=tuple(inputs["input_ids"][0].tolist()), max_tokens=8)).result()
        finally:
            engine.stop()

    finished = asyncio.run(serve_once())
    assert (finished.text, finished.finish_reason, finished.completion_tokens) == (expected, "stop", 1)
