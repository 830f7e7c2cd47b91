"""Data loading: every supported row format, the bundled sample, and errors that name file/line/field."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from cpuft.data.prepare import prepare_dataset
from cpuft.data.readers import SAMPLE_NAME, load_rows, sample_path
from cpuft.errors import UserError
from tests.conftest import run_cpuft, write_jsonl

GOOD_LINE = '{"prompt": "What is 2 plus 2?", "completion": "4."}'


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


# ----------------------------------------------------------------------------- bytes that are not UTF-8 text


def _latin1_on_line_3(path):
    """Two good rows, then a row saved as Latin-1 ("café" with byte 0xE9), then a good row."""
    lines = [GOOD_LINE.encode(), GOOD_LINE.encode(), '{"prompt": "café?", "completion": "yes"}'.encode("latin-1"),
             GOOD_LINE.encode()]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_invalid_utf8_in_jsonl_names_file_and_line(tmp_path):
    path = _latin1_on_line_3(tmp_path / "latin1.jsonl")
    with pytest.raises(UserError) as info:
        prepare_dataset(str(path), eval_fraction=0)
    message = str(info.value)
    # 0xE9 is the 16th byte of '{"prompt": "café?"...'.
    assert f"{path}:3: not valid UTF-8 (byte 0xe9 at byte 16 of the line)" in message
    assert "UTF-8" in message


def test_invalid_utf8_in_json_names_file_and_line(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(b'[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "caf\xe9", "completion": "c"}\n]\n')
    with pytest.raises(UserError, match=r"latin1\.json:3: not valid UTF-8 \(byte 0xe9"):
        prepare_dataset(str(path), eval_fraction=0)


def test_binary_files_renamed_jsonl_are_called_binary(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    executable = tmp_path / "python.jsonl"  # the first 4 KiB of a real executable: NUL bytes early on
    executable.write_bytes(open(sys.executable, "rb").read(4096))
    parquet = tmp_path / "rows.jsonl"
    pq.write_table(pa.Table.from_pylist([{"prompt": "p", "completion": "c"}]), parquet)
    compressed = tmp_path / "rows.jsonl.jsonl"
    compressed.write_bytes(gzip.compress((GOOD_LINE + "\n").encode()))
    for path, fragment in [(executable, "binary file, not JSON Lines text"), (parquet, "binary file (Parquet)"),
                           (compressed, "binary file (gzip-compressed)")]:
        with pytest.raises(UserError) as info:
            load_rows(str(path))
        assert str(path) in str(info.value) and fragment in str(info.value)


def test_utf8_bom_is_accepted_and_not_part_of_the_first_key(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + (GOOD_LINE + "\n").encode() * 3)
    data = prepare_dataset(str(path), eval_fraction=0)
    assert data.row_format == "prompt_completion"
    assert data.train[0]["messages"][0]["content"] == "What is 2 plus 2?"


def test_line_numbers_count_newlines_only(tmp_path):
    # U+2028 may appear unescaped inside a JSON string; it must not start a new line number.
    path = tmp_path / "separators.jsonl"
    path.write_text(json.dumps({"prompt": "a\u2028b", "completion": "c"}, ensure_ascii=False) + "\n"
                    + GOOD_LINE + "\n" + '{"prompt": "a",\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"separators\.jsonl:3: not valid JSON"):
        load_rows(str(path))


def test_sft_on_a_non_utf8_dataset_exits_2_before_writing_anything(tiny_model_dir, tmp_path):
    dataset = _latin1_on_line_3(tmp_path / "bad.jsonl")
    out = tmp_path / "run"
    result = run_cpuft("sft", "--model", tiny_model_dir, "--dataset", dataset, "--output-dir", out,
                       "--max-steps", "1", "--no-progress")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"{dataset}:3: not valid UTF-8" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_split_rows_keep_the_line_they_came_from(tmp_path):
    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(12)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = prepare_dataset(str(path), eval_fraction=0.25, seed=3)
    for split, where in ((data.train, data.train_where), (data.eval, data.eval_where)):
        assert len(where) == len(split)
        for row, origin in zip(split, where, strict=True):
            line = int(origin.rsplit(":", 1)[1])  # "rows.jsonl:7" is the 7th line, question 6
            assert origin.startswith(str(path)) and row["messages"][0]["content"] == f"question {line - 1}"


def test_pre_tokenised_rows_are_ordered_by_their_token_count():
    from cpuft.data.packing import row_length

    assert row_length({"input_ids": [5, 6, 7], "assistant_masks": [0, 1, 1]}) == 3
    assert row_length({"text": "abcd"}) == 4  # text rows: characters, a stand-in that ranks alike
