"""Hostile but realistic dataset files (issue 21, items 5-9): each ends in a UserError naming the
file, line and field (exit 2 at the CLI, nothing written), or is trained correctly at a cost
bounded by max_length.

- JSON nested 200,000 deep (past the parser) or 500 deep (parsed, then walked);
- a lone UTF-16 surrogate escape ("\\ud800"), which is not text;
- conversations of thousands of turns: the loss mask must not render every prefix of them;
- a row of megabytes: only what the first max_length tokens come from is tokenised;
- a named pipe (or a device) as --dataset: refused, never opened (that would block).

Costs are checked by counting what the tokenizer is asked to do (a counting wrapper around the
real tokenizer), never by timing; the CLI runs get a timeout of minutes that only catches a hang.
"""

from __future__ import annotations

import json
import os
import random
import subprocess

import pytest

from cpuft.data.loss_mask import tokenize_conversations
from cpuft.data.prepare import prepare_dataset
from cpuft.data.readers import MAX_NESTING_DEPTH, load_rows
from cpuft.data.training_set import tokenize_for_causal_lm
from cpuft.errors import UserError
from cpuft.testing.chat_templates import CHATML, chat_tokenizer
from cpuft.testing.tiny_model import sample_texts
from tests.conftest import run_cpuft, write_jsonl

GOOD_ROW = {"messages": [{"role": "user", "content": "What is 2 plus 2?"}, {"role": "assistant", "content": "4."}]}
WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "far", "away", "from", "home", "quickly", "and", "slowly"]
HANG_TIMEOUT = 300  # seconds: a CLI run this long is a hang (or quadratic work), not slowness


class CountingTokenizer:
    """The real tokenizer, counting what it is asked to do: chat-template renders, and the
    longest text it was given to tokenise."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.renders = 0
        self.longest_text = 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def apply_chat_template(self, *args, **kwargs):
        self.renders += 1
        return self._tokenizer.apply_chat_template(*args, **kwargs)

    def __call__(self, text=None, *args, **kwargs):
        if isinstance(text, str):
            self.longest_text = max(self.longest_text, len(text))
        return self._tokenizer(text, *args, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    return chat_tokenizer(CHATML, sample_texts())


def words(count: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(count))


def long_conversation(pairs: int) -> list[dict]:
    messages = []
    for turn in range(pairs):
        messages.append({"role": "user", "content": f"Question {turn}: {words(8, turn)}?"})
        messages.append({"role": "assistant", "content": f"Answer {turn}: {words(8, -turn)}."})
    return messages


def run_sft_cli(model_dir, dataset, out, *extra) -> subprocess.CompletedProcess:
    try:
        return run_cpuft("sft", "--model", model_dir, "--dataset", dataset, "--output-dir", out,
                         "--max-steps", "1", "--no-progress", *extra, timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"cpuft sft --dataset {dataset} still ran after {HANG_TIMEOUT} s")


def assert_refused(result: subprocess.CompletedProcess, out, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert not out.exists()


# --- 5. deeply nested JSON -------------------------------------------------------------------

def deep_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_past_the_parser_names_file_and_line(tmp_path):
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text(json.dumps(GOOD_ROW) + "\n" + '{"messages": ' + deep_list(200_000) + "}\n")
    with pytest.raises(UserError, match=r"deep\.jsonl:2: the JSON nests .* too deep to parse"):
        load_rows(str(jsonl))

    whole = tmp_path / "deep.json"  # the row on line 4 of a .json list
    whole.write_text("[\n" + json.dumps(GOOD_ROW) + ",\n\n" + '{"messages": ' + deep_list(200_000) + "}\n]\n")
    with pytest.raises(UserError, match=r"deep\.json:4: the JSON nests .* too deep to parse"):
        load_rows(str(whole))


def test_json_nested_500_deep_is_refused_naming_the_field(tmp_path):
    # Parsable, but every later walk over the row (pyarrow, a repr in a message) is one recursion
    # per level: the row is refused at read time, with the field.
    path = tmp_path / "deep500.jsonl"
    path.write_text(json.dumps(GOOD_ROW) + "\n" + '{"prompt": "hi", "completion": "there", "meta": '
                    + deep_list(500) + "}\n")
    with pytest.raises(UserError, match=rf"deep500\.jsonl:2: field 'meta\[0\]\[0\].*deeper than {MAX_NESTING_DEPTH} levels"):
        prepare_dataset(str(path), eval_fraction=0)
    # A row nested as deep as real rows get is read as before.
    ok = write_jsonl(tmp_path / "nested.jsonl", [dict(GOOD_ROW, meta={"a": [[{"b": [1, 2]}]]})])
    assert load_rows(str(ok))[0].data["meta"] == {"a": [[{"b": [1, 2]}]]}


def test_sft_on_deeply_nested_json_exits_2_before_writing(tiny_model_dir, tmp_path):
    dataset = tmp_path / "deep.jsonl"
    dataset.write_text(json.dumps(GOOD_ROW) + "\n" + '{"messages": ' + deep_list(200_000) + "}\n")
    out = tmp_path / "run"
    assert_refused(run_sft_cli(tiny_model_dir, dataset, out), out, f"{dataset}:2:", "too deep")


# --- 6. a lone UTF-16 surrogate ------------------------------------------------------------------

def test_lone_surrogate_names_file_line_and_field(tmp_path):
    path = tmp_path / "surrogate.jsonl"
    # The escape written literally, as a broken UTF-16 converter writes it; the file is valid UTF-8.
    path.write_text(json.dumps(GOOD_ROW) + "\n"
                    + '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok \\ud800 bye"}]}\n')
    with pytest.raises(UserError, match=r"surrogate\.jsonl:2: field 'messages\[1\]\.content' holds a lone UTF-16 surrogate"):
        prepare_dataset(str(path), eval_fraction=0)
    # A whole character written as its surrogate pair is text, and is read as the character.
    pair = tmp_path / "pair.jsonl"
    pair.write_text('{"prompt": "smile \\ud83d\\ude00", "completion": "ok"}\n')
    assert prepare_dataset(str(pair), eval_fraction=0).train[0]["messages"][0]["content"] == "smile \U0001F600"


def test_lone_surrogate_in_a_key_or_a_json_file_is_named(tmp_path):
    key = tmp_path / "key.jsonl"
    key.write_text('{"prompt": "a", "completion": "b", "x\\udc00": 1}\n')
    with pytest.raises(UserError, match=r"key\.jsonl:1: field 'x.* \(the key\)' holds a lone UTF-16 surrogate"):
        load_rows(str(key))
    whole = tmp_path / "rows.json"
    whole.write_text('[{"prompt": "a", "completion": "b"}, {"prompt": "\\udbff", "completion": "b"}]')
    with pytest.raises(UserError, match=r"rows\.json row 1: field 'prompt' holds a lone UTF-16 surrogate"):
        load_rows(str(whole))


def test_sft_on_a_lone_surrogate_exits_2_before_writing(tiny_model_dir, tmp_path):
    dataset = tmp_path / "surrogate.jsonl"
    dataset.write_text('{"prompt": "hi", "completion": "there"}\n{"prompt": "hi \\ud800", "completion": "there"}\n')
    out = tmp_path / "run"
    assert_refused(run_sft_cli(tiny_model_dir, dataset, out), out,
                   f"{dataset}:2: field 'prompt' holds a lone UTF-16 surrogate")


# --- 7. long conversations -----------------------------------------------------------------------

def test_a_2000_turn_conversation_renders_a_bounded_number_of_prefixes(tokenizer):
    conversation = long_conversation(2000)
    counting = CountingTokenizer(tokenizer)
    rows, counts = tokenize_conversations([conversation], counting, max_length=256)
    # Before: one render of the whole conversation plus two per assistant turn, 4,001.
    assert counting.renders < 100, counting.renders
    assert len(rows[0]["input_ids"]) == 256 and counts.truncated_conversations == 1

    # The mask is the one of the full computation (no max_length) on the first 40 turn pairs,
    # which already run past 256 tokens.
    start, _ = tokenize_conversations([conversation[:80]], tokenizer)
    assert len(start[0]["input_ids"]) > 256
    assert rows[0]["input_ids"] == start[0]["input_ids"][:256]
    assert rows[0]["assistant_masks"] == start[0]["assistant_masks"][:256]
    assert 0 < sum(rows[0]["assistant_masks"]) < 256


# --- 8. a row of megabytes ----------------------------------------------------------------------

@pytest.mark.parametrize("huge_turn", [1, 0], ids=["huge reply", "huge question"])
def test_a_huge_row_is_cut_before_tokenising_and_trains_the_same_tokens(tokenizer, huge_turn):
    huge = words(600_000, seed=1)  # ~3 MB
    conversation = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": "Here it is."},
                    {"role": "user", "content": "More."}, {"role": "assistant", "content": "Done."}]
    conversation[huge_turn] = dict(conversation[huge_turn], content=huge)
    counting = CountingTokenizer(tokenizer)
    for loss_on in ("assistant", "all"):
        rows, _ = tokenize_conversations([conversation], counting, loss_on=loss_on, max_length=128)
        # Before: the whole 3 MB row was tokenised (with offsets), then cut to 128 tokens.
        assert counting.longest_text < 100_000, counting.longest_text

        cut_by_hand = [dict(m, content=m["content"][:20_000]) for m in conversation]
        expected, _ = tokenize_conversations([cut_by_hand], tokenizer, loss_on=loss_on)
        assert len(expected[0]["input_ids"]) > 128
        assert rows[0]["input_ids"] == expected[0]["input_ids"][:128]
        assert rows[0]["assistant_masks"] == expected[0]["assistant_masks"][:128]


def test_a_huge_plain_text_row_is_cut_before_the_trainer_tokenises_it(tokenizer, tmp_path):
    huge = words(600_000, seed=2)
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": "a short row"}, {"text": huge}])
    counting = CountingTokenizer(tokenizer)
    data = tokenize_for_causal_lm(prepare_dataset(str(path), eval_fraction=0), counting, "all", 128, log=lambda *a: None)
    texts = sorted(data.train["text"], key=len)
    assert texts[0] == "a short row"  # short rows are left as they are
    assert len(texts[1]) < 100_000 and huge.startswith(texts[1])
    assert counting.longest_text < 100_000  # the token count for the time plan included
    assert tokenizer(texts[1])["input_ids"][:128] == tokenizer(huge[:20_000])["input_ids"][:128]


def test_a_normalizer_that_drops_characters_moves_the_cut_out(tokenizer):
    # A token of this tokenizer stands for any number of "x"s (its normalizer deletes them), so
    # the cut made from the longest token must be checked on the offsets and moved out.
    from tokenizers import normalizers

    dropping = chat_tokenizer(CHATML, sample_texts())
    dropping.backend_tokenizer.normalizer = normalizers.Replace("x", "")
    conversation = [{"role": "user", "content": "x" * 200_000 + " " + words(5, seed=3)},
                    {"role": "assistant", "content": words(400, seed=4)}]
    rows, _ = tokenize_conversations([conversation], dropping, max_length=128)
    whole, _ = tokenize_conversations([conversation], dropping)
    assert rows[0]["input_ids"] == whole[0]["input_ids"][:128]
    assert rows[0]["assistant_masks"] == whole[0]["assistant_masks"][:128]
    assert any(rows[0]["assistant_masks"])


def test_sft_dry_run_on_long_and_huge_rows_finishes_and_writes_nothing(tiny_model_dir, tmp_path):
    rows = [GOOD_ROW] * 10 + [{"messages": long_conversation(4000)},
                              {"messages": [{"role": "user", "content": "Tell me."},
                                            {"role": "assistant", "content": words(600_000, seed=5)}]}]
    dataset = write_jsonl(tmp_path / "long.jsonl", rows)
    out = tmp_path / "run"
    # Before: every prefix of the 4,000-pair conversation was rendered and tokenised, quadratic
    # work: 1,000 pairs took 58 s here, 4,000 would take about 15 minutes.
    result = run_sft_cli(tiny_model_dir, dataset, out, "--max-length", "256", "--dry-run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loss on: assistant tokens" in result.stdout and "dry run" in result.stdout
    assert not out.exists()


# --- 9. a named pipe ----------------------------------------------------------------------------

def test_a_named_pipe_or_device_is_refused_without_opening_it(tmp_path):
    fifo = tmp_path / "rows.jsonl"
    os.mkfifo(fifo)  # opening it to read would block: no writer ever comes
    with pytest.raises(UserError, match=r"rows\.jsonl is a named pipe \(FIFO\), not a regular file.*Write the data"):
        load_rows(str(fifo))
    with pytest.raises(UserError, match=r"/dev/null is a character device, not a regular file"):
        load_rows("/dev/null")


def test_sft_on_a_named_pipe_exits_2_before_writing(tiny_model_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    out = tmp_path / "run"
    assert_refused(run_sft_cli(tiny_model_dir, fifo, out), out, f"dataset {fifo} is a named pipe (FIFO)",
                   "Write the data to a .jsonl, .json or .parquet file first")


def test_cpuft_plans_token_count_cuts_a_huge_conversation_before_tokenising_it(tokenizer):
    from datasets import Dataset

    from cpuft.data.training_set import tokens_per_epoch

    huge = [{"role": "user", "content": "Tell me everything."}, {"role": "assistant", "content": words(600_000, seed=3)}]
    short = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    counting = CountingTokenizer(tokenizer)
    # `cpuft plan` counts conversations untokenised (the trainer's rows are pre-tokenised).
    tokens, _ = tokens_per_epoch(Dataset.from_list([{"messages": short}, {"messages": huge}]), counting, 128)
    assert counting.longest_text < 100_000, counting.longest_text  # before: the whole ~3 MB conversation
    short_tokens = len(tokenizer.apply_chat_template(short, tokenize=True, return_dict=False))
    assert tokens == short_tokens + 128
    # Plain text rows alike (before: tokenised whole through the tokenizer's own call).
    tokens, _ = tokens_per_epoch(Dataset.from_list([{"text": words(600_000, seed=4)}]), counting, 128)
    assert counting.longest_text < 100_000 and tokens == 128


def test_a_huge_preference_pair_is_cut_before_it_is_tokenised(tokenizer, tmp_path):
    from cpuft.data.preference import prepare_preferences
    from cpuft.train.dpo import preference_set

    huge = words(600_000, seed=5)
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "Say a lot.", "chosen": huge, "rejected": "No."},
                                                  {"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go."}])
    counting = CountingTokenizer(tokenizer)
    data = preference_set(prepare_preferences(str(path), eval_fraction=0), counting, 128)
    assert counting.longest_text < 100_000, counting.longest_text  # before: the whole ~3 MB reply
    by_prompt = {row["prompt"]: row for row in data.train}
    assert by_prompt["Hi?"]["chosen"] == "Hello there."  # short rows are left as they are
    cut = by_prompt["Say a lot."]["chosen"]
    assert len(cut) < 100_000 and huge.startswith(cut)
    # What TRL trains (prompt + chosen, first 128 tokens) is unchanged by the cut.
    assert tokenizer("Say a lot." + cut)["input_ids"][:128] == tokenizer("Say a lot." + huge[:20_000])["input_ids"][:128]
