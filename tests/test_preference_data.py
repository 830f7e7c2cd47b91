"""Preference data for `cpuft dpo` (issue 23): TRL's four preference formats in, TRL's explicit rows
out; every malformed row a UserError naming file:line and field; the bundled preference sample; and
TRL's own DPOTrainer accepting the rows."""

from __future__ import annotations

import json

import pytest

from cpuft.data.preference import (
    PREFERENCE_SAMPLE,
    preference_sample_path,
    prepare_preferences,
)
from cpuft.errors import UserError
from tests.conftest import write_jsonl


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def system(text):
    return {"role": "system", "content": text}


# (row as written in the file, the row DPOTrainer is given, row_format, prompt_style)
FORMATS = {
    "standard-explicit": (
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        "standard", "explicit",
    ),
    "standard-implicit": (
        {"chosen": "The sky is blue.", "rejected": "The sky is green."},
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
        "standard", "implicit",
    ),
    "conversational-explicit": (
        {"prompt": [system("Be brief."), user("What color is the sky?")],
         "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
        {"prompt": [system("Be brief."), user("What color is the sky?")],
         "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
        "conversational", "explicit",
    ),
    "conversational-implicit": (
        {"chosen": [user("Hi"), assistant("Hello!"), user("What color is the sky?"), assistant("It is blue.")],
         "rejected": [user("Hi"), assistant("Hello!"), user("What color is the sky?"), assistant("It is green.")]},
        {"prompt": [user("Hi"), assistant("Hello!"), user("What color is the sky?")],
         "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
        "conversational", "implicit",
    ),
    # HuggingFaceH4/ultrafeedback_binarized: a string prompt that repeats the conversations' first turn.
    "conversational-implicit-with-string-prompt": (
        {"prompt": "What color is the sky?", "messages": "extra keys are dropped",
         "chosen": [user("What color is the sky?"), assistant("It is blue.")],
         "rejected": [user("What color is the sky?"), assistant("It is green.")]},
        {"prompt": [user("What color is the sky?")],
         "chosen": [assistant("It is blue.")], "rejected": [assistant("It is green.")]},
        "conversational", "implicit",
    ),
}


@pytest.mark.parametrize("name", FORMATS)
def test_each_preference_format_becomes_trl_explicit_rows(tmp_path, name):
    written, expected, row_format, prompt_style = FORMATS[name]
    path = write_jsonl(tmp_path / "pairs.jsonl", [written])
    prepared = prepare_preferences(str(path))
    assert (prepared.row_format, prepared.prompt_style) == (row_format, prompt_style)
    assert prepared.description == f"{row_format}, {prompt_style} prompt"
    assert prepared.train.to_list() == [expected]
    assert prepared.eval is None and prepared.eval_where is None
    assert prepared.train_where == [f"{path}:1"] and prepared.num_rows == 1


GOOD_STANDARD = {"prompt": "Q?", "chosen": "A good answer.", "rejected": "No."}
GOOD_CHAT = {"prompt": [user("Q?")], "chosen": [assistant("A good answer.")], "rejected": [assistant("No.")]}
GOOD_IMPLICIT_CHAT = {"chosen": [user("Q?"), assistant("Yes.")], "rejected": [user("Q?"), assistant("No.")]}

# (first row, the bad second row, fragments the message must hold besides "pairs.jsonl:2")
MALFORMED = {
    "missing-rejected": (GOOD_STANDARD, {"prompt": "Q?", "chosen": "A."}, ["'rejected'", "['chosen', 'prompt']"]),
    "missing-chosen": (GOOD_STANDARD, {"prompt": "Q?", "rejected": "A."}, ["'chosen'", "['prompt', 'rejected']"]),
    "chosen-number": (GOOD_STANDARD, {"prompt": "Q?", "chosen": 3, "rejected": "No."}, ["field 'chosen'", "got int"]),
    "rejected-null": (GOOD_STANDARD, {"prompt": "Q?", "chosen": "A.", "rejected": None}, ["field 'rejected'", "got null"]),
    "prompt-nested-junk": (GOOD_STANDARD, {"prompt": {"text": "Q?"}, "chosen": "A.", "rejected": "No."},
                           ["field 'prompt'", "got dict"]),
    "empty-string": (GOOD_STANDARD, {"prompt": "Q?", "chosen": "A.", "rejected": "  "}, ["field 'rejected' is empty"]),
    "equal-strings": (GOOD_STANDARD, {"prompt": "Q?", "chosen": "Same.", "rejected": " Same.\n"},
                      ["chosen equals rejected: the pair teaches nothing"]),
    "content-number": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [assistant("Fine."), {"role": "assistant", "content": 5}]},
                       ["field 'chosen[1].content'", "got int"]),
    "content-nested": (GOOD_CHAT, {**GOOD_CHAT, "rejected": [{"role": "assistant", "content": [{"type": "text"}]}]},
                       ["field 'rejected[0].content'", "got list"]),
    "content-empty": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [assistant(" ")]}, ["field 'chosen[0].content' is empty"]),
    "message-not-object": (GOOD_CHAT, {**GOOD_CHAT, "chosen": ["It is blue."]}, ["field 'chosen[0]'", "got str"]),
    "empty-message-list": (GOOD_CHAT, {**GOOD_CHAT, "rejected": []}, ["field 'rejected' is an empty list"]),
    "unknown-role": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [{"role": "bot", "content": "Q?"}]},
                     ["field 'prompt[0].role'", "'bot'", "system, user, assistant"]),
    "user-turn-in-chosen": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [user("Q?"), assistant("A.")]},
                            ["field 'chosen[0].role'", "'user'", "only the assistant's reply"]),
    "prompt-ends-with-assistant": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [user("Q?"), assistant("Hm.")]},
                                   ["field 'prompt'", "must end with a user message"]),
    "system-not-first": (GOOD_CHAT, {**GOOD_CHAT, "prompt": [user("Q?"), system("Be brief.")]},
                         ["field 'prompt[1]'", "system message may only come first"]),
    "equal-messages": (GOOD_CHAT, {**GOOD_CHAT, "chosen": [assistant("Same.")], "rejected": [assistant("Same. ")]},
                       ["chosen equals rejected: the pair teaches nothing"]),
    "conversational-after-standard": (GOOD_STANDARD, GOOD_CHAT,
                                      ["conversational", "first row", "pairs.jsonl:1) is standard"]),
    "implicit-after-explicit": (GOOD_CHAT, GOOD_IMPLICIT_CHAT, ["implicit prompt", "first row", "explicit prompt"]),
    "chosen-string-rejected-messages": (GOOD_STANDARD, {**GOOD_STANDARD, "rejected": [assistant("No.")]},
                                        ["field 'rejected' is conversational", "'chosen' is standard"]),
    "string-prompt-with-reply-messages": (GOOD_CHAT, {**GOOD_CHAT, "prompt": "Q?"},
                                          ["field 'prompt' is a string", "list of messages"]),
    "implicit-no-shared-text": ({"chosen": "Q? Yes.", "rejected": "Q? No."}, {"chosen": "Yes. ", "rejected": "No."},
                                ["'chosen' and 'rejected' share no leading prompt"]),
    "implicit-differ-at-user-turn": (
        GOOD_IMPLICIT_CHAT,
        {"chosen": [user("Hi"), assistant("Hello"), user("Q?"), assistant("A.")],
         "rejected": [user("Hi"), assistant("Hello"), user("Other?"), assistant("B.")]},
        ["first differ at message 2", "'chosen[2]'", "user turn"]),
    "implicit-rejected-continues": (
        GOOD_IMPLICIT_CHAT,
        {"chosen": [user("Q?"), assistant("A.")], "rejected": [user("Q?"), assistant("A."), user("And?"), assistant("B.")]},
        ["field 'rejected[2].role'", "'user'"]),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_row_is_a_user_error_naming_file_line_and_field(tmp_path, name):
    first, bad, fragments = MALFORMED[name]
    path = write_jsonl(tmp_path / "pairs.jsonl", [first, bad, first])
    with pytest.raises(UserError) as caught:
        prepare_preferences(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}:2: "), message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("row", [
    {"conversations": ["Q?", "A."], "source": "lima"},
    {"messages": [user("Q?"), assistant("A.")]},
    {"prompt": "Q?", "completion": "A."},
    {"instruction": "Q?", "output": "A."},
    {"text": "Just text."},
], ids=["lima", "messages", "prompt_completion", "alpaca", "text"])
def test_sft_shaped_data_points_at_cpuft_sft(tmp_path, row):
    path = write_jsonl(tmp_path / "sft.jsonl", [row])
    with pytest.raises(UserError) as caught:
        prepare_preferences(str(path))
    message = str(caught.value)
    assert message.startswith(f"{path}:1: ") and "cpuft sft" in message and "'chosen' and 'rejected'" in message


def test_a_row_with_unrelated_keys_names_the_keys_it_has(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"question": "Q?", "answer": "A."}])
    with pytest.raises(UserError, match=r"odd.jsonl:1: missing field 'chosen' and 'rejected'; the row has keys \['answer', 'question'\]"):
        prepare_preferences(str(path))


def test_bundled_preference_sample():
    rows = [json.loads(line) for line in preference_sample_path().read_text().splitlines()]
    prepared = prepare_preferences(PREFERENCE_SAMPLE)
    assert prepared.num_rows == len(rows) >= 60
    assert prepared.description == "conversational, explicit prompt"
    # 5 % of 72 rows, rounded; every row once, in train or eval.
    assert (len(prepared.train), len(prepared.eval)) == (len(rows) - round(len(rows) * 0.05), round(len(rows) * 0.05))
    assert sorted(prepared.train_where + prepared.eval_where) == sorted(
        f"{preference_sample_path()}:{number}" for number in range(1, len(rows) + 1))
    prompts = [row["prompt"][0]["content"] for row in rows]
    assert len(set(prompts)) == len(rows)  # held-out pairs are questions the model never trained on
    for row in prepared.train.to_list() + prepared.eval.to_list():
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert chosen.strip() != rejected.strip()
        # The contrast a tiny model can learn: a full, consistently framed answer against a non-answer.
        assert chosen.startswith("Happy to help. ") and chosen.endswith(" I hope this helps.")
        assert len(rejected) < 40 < len(chosen)


def test_split_is_seeded_and_matches_sft_rules(tmp_path):
    pairs = [{"prompt": f"Q{i}?", "chosen": f"Answer {i}.", "rejected": "No."} for i in range(20)]
    nine = write_jsonl(tmp_path / "nine.jsonl", pairs[:9])
    twenty = write_jsonl(tmp_path / "twenty.jsonl", pairs)
    assert prepare_preferences(str(nine), eval_fraction=0.5).eval is None  # fewer than 10 rows: no eval
    assert len(prepare_preferences(str(twenty), eval_fraction=0.01).eval) == 1  # at least one
    assert prepare_preferences(str(twenty), eval_fraction=0).eval is None
    one, same, other = (prepare_preferences(str(twenty), eval_fraction=0.2, seed=seed) for seed in (1, 1, 2))
    assert len(one.eval) == 4 and one.eval_where == same.eval_where != other.eval_where
    assert prepare_preferences(str(twenty), max_samples=12).num_rows == 12


def test_sample_has_no_revision_and_empty_file_is_refused(tmp_path):
    with pytest.raises(UserError, match="bundled preference sample, which has no revisions"):
        prepare_preferences(PREFERENCE_SAMPLE, revision="main")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(UserError, match="no preference pairs"):
        prepare_preferences(str(empty))


@pytest.mark.parametrize("source", ["sample", "standard"])
def test_trl_dpo_trainer_accepts_the_rows(tiny_model_dir, tmp_path, source):
    """TRL's own DPOTrainer.__init__ runs its `_prepare_dataset` (prompt extraction, EOS, the chat
    template, tokenization) on the rows; the tokens it keeps decode back to our prompt and replies,
    and one DPO step runs on them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    if source == "standard":
        path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": "The sky is blue.", "rejected": "The sky is green."}] * 2)
        prepared = prepare_preferences(str(path))
    else:
        prepared = prepare_preferences(PREFERENCE_SAMPLE, max_samples=12)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "out"), bf16=False, use_cpu=True, report_to="none",
                     per_device_train_batch_size=2, max_steps=1)
    trainer = DPOTrainer(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                         processing_class=tokenizer)
    processed = trainer.train_dataset
    assert len(processed) == len(prepared.train)
    for ours, theirs in zip(prepared.train.to_list()[:2], processed.to_list()[:2]):
        prompt, chosen, rejected = (tokenizer.decode(theirs[key]) for key in ("prompt_ids", "chosen_ids", "rejected_ids"))
        if source == "sample":
            assert ours["prompt"][0]["content"] in prompt
            assert ours["chosen"][0]["content"] in chosen and ours["rejected"][0]["content"] in rejected
        else:
            assert (prompt, chosen, rejected) == ("The sky is", f" blue.{tokenizer.eos_token}", f" green.{tokenizer.eos_token}")
    metrics = trainer.train().metrics  # one real DPO step through TRL's collator and loss
    assert metrics["train_loss"] == pytest.approx(metrics["train_loss"])  # a number, not NaN
