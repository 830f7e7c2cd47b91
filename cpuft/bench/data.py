"""The bench's rows: synthetic LIMA-shaped conversations (`--job sft`) or preference pairs
(`--job dpo`), or the user's --dataset, as the train/eval .jsonl files every variant reads.

The synthetic data is generated from a fixed seed, so the bench runs offline and is
reproducible. The preference pairs share the conversations' prompts and lengths: chosen is the
full reply, rejected a short reply or the same words shuffled (a degraded reply of the same
length), so a model can learn the preference and padding costs what it costs on real data.

Limits: an SFT --dataset must already be in TRL's messages format; it is not converted (`cpuft
sft` reads the other formats). A DPO --dataset is a local file of preference pairs in any format
`cpuft dpo` reads (cpuft.data.preference validates it, naming file:line and field); it is written
for every variant as explicit {"prompt", "chosen", "rejected"} rows.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from cpuft.artifacts import atomic_write_text
from cpuft.errors import UserError


def synthetic_conversations(count: int, seed: int, median_reply_words: int) -> list[dict]:
    """`count` user/assistant conversations in TRL's messages format, reproducible from `seed`.

    Words follow a fixed random bigram chain over a pseudo-word lexicon (so there is something
    to learn); lengths are log-normal like instruction data (most replies short, a long tail),
    which is what makes padding expensive for naive batching.
    """
    rng = random.Random(seed)
    lexicon = _lexicon(random.Random(1234), 3000)
    successors = [[rng.randrange(len(lexicon)) for _ in range(6)] for _ in lexicon]
    rows = []
    for _ in range(count):
        prompt_words = _lognormal_words(rng, median_reply_words / 4, 0.6)
        reply_words = _lognormal_words(rng, median_reply_words, 0.9)
        rows.append({
            "messages": [
                {"role": "user", "content": _bigram_text(rng, lexicon, successors, prompt_words) + "?"},
                {"role": "assistant", "content": _bigram_text(rng, lexicon, successors, reply_words) + "."},
            ]
        })
    return rows


def synthetic_preference_pairs(count: int, seed: int, median_reply_words: int) -> list[dict]:
    """`count` conversational preference pairs (TRL's explicit-prompt format), reproducible from `seed`.

    The prompt and the chosen reply are `synthetic_conversations`' (the bigram chain, log-normal
    lengths); the rejected reply is, half the time, a short reply (a few words of the chain) and
    otherwise the chosen reply's words shuffled: as long as chosen, but off the chain.
    """
    rng = random.Random(seed + 1)
    pairs = []
    for row in synthetic_conversations(count, seed, median_reply_words):
        prompt, reply = row["messages"]
        words = reply["content"].rstrip(".").split()
        if rng.random() < 0.5:
            rejected_words = words[:max(2, min(len(words) - 1, len(words) // 8))]
        else:
            rejected_words = rng.sample(words, len(words))
            if rejected_words == words:  # a short reply shuffled into its own order: cut it instead
                rejected_words = words[:-1]
        pairs.append({
            "prompt": [prompt],
            "chosen": [reply],
            "rejected": [{"role": "assistant", "content": " ".join(rejected_words) + "."}],
        })
    return pairs


def write_bench_preferences(work: Path, train_rows: int, eval_rows: int, dataset: str | None, seed: int,
                            median_reply_words: int) -> tuple[Path, Path, str]:
    """work/train.jsonl and work/eval.jsonl of preference pairs, and a line describing them.

    From `dataset` (its first pairs train, the next evaluate; every row validated as `cpuft dpo`
    does) or synthetic. UserError, before anything is written, when `dataset` is missing, holds a
    malformed pair or is too short.
    """
    if dataset:
        from cpuft.data.preference import convert_preference_rows
        from cpuft.data.readers import load_rows

        path = Path(dataset)
        if not path.is_file():
            raise UserError(f"--dataset {path} does not exist (a .jsonl/.json/.parquet file of preference pairs).")
        needed = train_rows + eval_rows
        loaded = load_rows(str(path), "train")
        if len(loaded) < needed:
            raise UserError(f"--dataset {path} has {len(loaded)} pairs; this bench needs {needed}.")
        rows, _, _ = convert_preference_rows(loaded[:needed])
        note = f"{path}: first {train_rows} pairs train, next {eval_rows} evaluate"
    else:
        rows = synthetic_preference_pairs(train_rows + eval_rows, seed, median_reply_words)
        note = (f"synthetic preference pairs: {train_rows} train / {eval_rows} held out; prompt and chosen reply"
                f" log-normal, median reply {median_reply_words} words; rejected: a short reply or the chosen"
                f" words shuffled (seed {seed})")
    work.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = work / "train.jsonl", work / "eval.jsonl"
    write_jsonl(train_path, rows[:train_rows])
    write_jsonl(eval_path, rows[train_rows:train_rows + eval_rows])
    return train_path, eval_path, note


def write_bench_data(work: Path, train_rows: int, eval_rows: int, dataset: str | None, seed: int,
                     median_reply_words: int) -> tuple[Path, Path, str]:
    """work/train.jsonl and work/eval.jsonl, and a line describing them for the report.

    From `dataset` (its first rows train, the next evaluate) or synthetic. UserError, before
    anything is written, when `dataset` is missing, not in messages format or too short.
    """
    if dataset:
        path = Path(dataset)
        if not path.is_file():
            raise UserError(f"--dataset {path} does not exist (a messages-format .jsonl file).")
        rows = read_jsonl(path)
        if not rows or "messages" not in rows[0]:
            raise UserError(f"--dataset {path}: expected rows like {{\"messages\": [...]}} (TRL's messages format).")
        needed = train_rows + eval_rows
        if len(rows) < needed:
            raise UserError(f"--dataset {path} has {len(rows)} rows; this bench needs {needed}.")
        note = f"{path}: first {train_rows} rows train, next {eval_rows} evaluate"
    else:
        rows = synthetic_conversations(train_rows + eval_rows, seed, median_reply_words)
        note = (f"synthetic: {train_rows} train / {eval_rows} eval conversations, log-normal lengths,"
                f" median reply {median_reply_words} words (seed {seed})")
    work.mkdir(parents=True, exist_ok=True)
    train_path, eval_path = work / "train.jsonl", work / "eval.jsonl"
    write_jsonl(train_path, rows[:train_rows])
    write_jsonl(eval_path, rows[train_rows:train_rows + eval_rows])
    return train_path, eval_path, note


def write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(row) + "\n" for row in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _lexicon(rng: random.Random, size: int) -> list[str]:
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < size:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((1, 2, 2, 3)))))
    return sorted(words)


def _lognormal_words(rng: random.Random, median: float, sigma: float) -> int:
    return max(3, int(rng.lognormvariate(math.log(max(median, 1.0)), sigma)))


def _bigram_text(rng: random.Random, lexicon: list[str], successors: list[list[int]], words: int) -> str:
    current = rng.randrange(len(lexicon))
    out = []
    for _ in range(words):
        out.append(lexicon[current])
        current = rng.choice(successors[current]) if rng.random() < 0.85 else rng.randrange(len(lexicon))
    return " ".join(out)
