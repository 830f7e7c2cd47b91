"""Not computing on padding: length-grouped batches, and packing that keeps samples apart.

Length grouping (the default). `length_grouped_order` shuffles the rows, sorts each window of
`window_batches` micro-batches by length, cuts the window into micro-batches and shuffles the
micro-batches, so every batch holds rows of similar length and the run is not a long-to-short
curriculum. transformers' own `group_by_length` sampler sorts within mega-batches of
`min(50, rows // (4 * batch))` batches: on a short run (a few hundred rows) that is 2-3
batches, and most of the padding stays (measured in `cpuft bench`). The order is a pure
function of the seed, so a resumed run sees the same batches.

Packing (opt-in, `packing: true`). TRL's best-fit-decreasing packing fills rows of
`max_length` with whole samples, and its padding-free collator flattens a micro-batch into one
row with `position_ids` that restart at 0 for every sample and no attention mask. Whether
attention then stays inside each sample depends on the attention kernel:
- transformers 5's mask builder (`masking_utils.find_packed_sequence_indices`) turns restarting
  position_ids into a block-diagonal causal mask for sdpa, eager and flex attention, but only
  when there is no KV cache and no 2D attention mask. TRL's `compute_loss` passes
  `use_cache=False`; a plain `model(...)` call with the config's `use_cache=True` creates a
  cache and silently lets samples attend to each other (tests/test_packing.py shows both).
- FlashAttention reads the `cu_seq_lens` TRL adds.
So with `cpuft.planning.plan.PACKING_SAFE_ATTENTION` kernels packing is exact: per-sample losses packed equal the
unpacked ones (tests/test_packing.py). TRL flattens a micro-batch of B packed rows into one
sequence of B x max_length, and SDPA on CPU computes the dense block-diagonal mask over all of
it (attention work grows with the square of the flattened length), so the plan packs one row
per micro-batch and accumulates.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def length_grouped_order(lengths: Sequence[int], batch_size: int, seed: int, window_batches: int = 64) -> list[int]:
    """Row order whose consecutive `batch_size` slices hold rows of similar length.

    `window_batches` bounds how far a row can move from its shuffled position: sorting a
    window of 64 micro-batches removes most padding while keeping the data mixed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * max(1, window_batches)
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    return [i for batch in batches for i in batch]


def row_length(row: dict) -> int:
    """A row's token count when it is pre-tokenised (conversations, cpuft.data.loss_mask), else a
    cheap stand-in (characters of its text): ordering needs only lengths that rank like token
    counts, not the tokenizer's exact numbers."""
    if "input_ids" in row:
        return len(row["input_ids"])
    if "messages" in row:
        return sum(len(str(m.get("content", ""))) for m in row["messages"])
    if "prompt" in row and "completion" in row:
        return len(str(row["prompt"])) + len(str(row["completion"]))
    return len(str(row.get("text", "")))


def order_by_length(dataset, batch_size: int, seed: int):
    """`dataset` (a datasets.Dataset of TRL rows) reordered by `length_grouped_order`; train it
    with a sequential sampler so the order holds."""
    lengths = [row_length(row) for row in dataset]
    return dataset.select(length_grouped_order(lengths, batch_size, seed))
