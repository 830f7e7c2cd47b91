"""Data loading: every supported row format, the bundled sample, and errors that name file/line/field."""

from __future__ import annotations

import json

import pytest

from cpuft.data.prepare import SAMPLE_NAME, load_rows, prepare_dataset, sample_path
from cpuft.errors import UserError
from tests.conftest import write_jsonl


def test_bundled_sample_is_lima_shaped_and_large_enough():
    rows = [json.loads(line) for line in sample_path().read_text().splitlines() if line.strip()]
    assert len(rows) >= 200
    assert all(set(row) == {"conversations", "source"} for row in rows)
    lengths = [len(row["conversations"]) for row in rows]
    assert all(n >= 2 and n % 2 == 0 for n in lengths)
    assert sum(n > 2 for n in lengths) >= 20  # some multi-turn
    answer_chars = sorted(len(row["conversations"][1]) for row in rows)
    assert answer_chars[0] < 200 and answer_chars[-1] > 1500  # varied lengths
    firsts = [row["conversations"][0] for row in rows]
    assert len(set(firsts)) == len(firsts)


def test_sample_converts_to_alternating_messages():
    data = prepare_dataset(SAMPLE_NAME, eval_fraction=0.1, seed=1)
    assert data.row_format == "lima"
    assert len(data.train) + len(data.eval) == data.num_rows
    assert len(data.eval) == round(data.num_rows * 0.1)
    for example in data.train.select(range(20)):
        roles = [m["role"] for m in example["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)


def test_split_is_deterministic_per_seed():
    a = prepare_dataset(SAMPLE_NAME, eval_fraction=0.1, seed=3)
    b = prepare_dataset(SAMPLE_NAME, eval_fraction=0.1, seed=3)
    c = prepare_dataset(SAMPLE_NAME, eval_fraction=0.1, seed=4)
    assert a.eval["messages"] == b.eval["messages"]
    assert a.eval["messages"] != c.eval["messages"]


@pytest.mark.parametrize(
    "row,expected_format,expected_first_user",
    [
        ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                       {"role": "assistant", "content": "Hello"}]}, "messages", "Hi"),
        ({"prompt": "2+2?", "completion": "4"}, "prompt_completion", "2+2?"),
        ({"instruction": "Translate", "input": "chat", "output": "cat"}, "alpaca", "Translate\n\nchat"),
        ({"instruction": "Say hi", "input": "", "output": "hi"}, "alpaca", "Say hi"),
        ({"conversations": ["Q", "A"], "source": "x"}, "lima", "Q"),
    ],
)
def test_formats_are_detected_and_converted(tmp_path, row, expected_format, expected_first_user):
    path = write_jsonl(tmp_path / "d.jsonl", [row] * 3)
    data = prepare_dataset(str(path), eval_fraction=0)
    assert data.row_format == expected_format
    messages = data.train[0]["messages"]
    assert next(m["content"] for m in messages if m["role"] == "user") == expected_first_user
    assert messages[-1]["role"] == "assistant"


def test_plain_text_format(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "once upon a time"}])
    data = prepare_dataset(str(path), eval_fraction=0)
    assert data.row_format == "text" and data.train[0]["text"] == "once upon a time"


def test_json_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(12)]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    for name in ("d.json", "d.parquet"):
        data = prepare_dataset(str(tmp_path / name), eval_fraction=0.25, seed=0)
        assert data.num_rows == 12 and len(data.eval) == 3


def test_format_override(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "x", "prompt": "p", "completion": "c"}])
    assert prepare_dataset(str(path), eval_fraction=0).row_format == "prompt_completion"
    assert prepare_dataset(str(path), row_format="text", eval_fraction=0).row_format == "text"


@pytest.mark.parametrize(
    "rows,fragment",
    [
        ([{"conversations": ["Q", "A"]}, {"conversations": ["Q", "A", "Q2"]}], ":2: field 'conversations' has 3 turns"),
        ([{"conversations": ["Q", "A"]}, {"conversations": ["Q", ""]}], ":2: field 'conversations[1]'"),
        ([{"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "yo"}]}], "messages[1]'.role is 'bot'"),
        ([{"messages": [{"role": "assistant", "content": "hi"}]}], "'messages[0]'.role is 'assistant' but 'user'"),
        ([{"messages": [{"role": "user", "content": "hi"}]}], "must end with an assistant"),
        ([{"prompt": "p", "completion": 3}], "field 'completion' must be a string"),
        ([{"instruction": "i", "output": "  "}], "field 'output' is empty"),
        ([{"question": "q", "answer": "a"}], "cannot tell the row format"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, rows, fragment):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(UserError) as info:
        prepare_dataset(str(path), eval_fraction=0)
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_malformed_json_line_is_named(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "a",\n')
    with pytest.raises(UserError, match=r"broken.jsonl:2: not valid JSON"):
        load_rows(str(path))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UserError, match="is a directory"):
        load_rows(str(tmp_path))


def test_unreachable_hub_dataset_says_how_to_use_a_local_copy(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as info:
        load_rows("GAIR/lima")
    message = str(info.value)
    assert "GAIR/lima" in message and "HF_TOKEN" in message and "--dataset ./" in message
