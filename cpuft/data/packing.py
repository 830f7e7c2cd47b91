"""Not computing on padding: length-grouped batches, and packing that keeps samples apart.

Length grouping (the default). `length_grouped_order` shuffles the rows, sorts each window of
`window_steps` optimizer steps by length, cuts the window into optimizer steps (the global batch:
micro-batch x accumulation x world size, rows longest first) and shuffles the steps, so every
micro-batch holds rows of similar length and the run is not a long-to-short curriculum.
transformers' own `group_by_length` sampler sorts within mega-batches of
`min(50, rows // (4 * batch))` batches: on a short run (a few hundred rows) that is 2-3
batches, and most of the padding stays (measured in `cpuft bench`). The order is a pure
function of the rows' lengths, the global batch and the seed, so a resumed run sees the same
steps.

Why the optimizer step, not the micro-batch, is the unit: the Trainer reads the order
sequentially, cuts it into micro-batches and (accelerate's BatchSamplerShard) deals micro-batch
i to rank i mod W; each rank accumulates its next A micro-batches. Optimizer step k therefore
trains exactly rows [k x G, (k + 1) x G) of the order (G = micro-batch x A x W), however G is
split. An order grouped by micro-batch changes with the split; one grouped by G does not, so one
process, DDP over any number of ranks and a run resumed on another number of processes train the
same rows in every step (tests/test_packing.py, tests/test_distributed.py). Limits: the global
batch must stay the same (a different G is a different order), and dropout draws random numbers
per rank, so only a run without dropout is the same to rounding.
The order's length is rounded up to a multiple of G: the step left short by the rows' count is
filled with rows drawn (seeded) from the other steps, so each epoch repeats up to G - 1 rows.
Left short, one process would train a smaller last step while accelerate fills DDP's last step
from the epoch's first rows: the two would differ there.

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


def length_grouped_order(lengths: Sequence[int], step_rows: int, seed: int, window_steps: int = 64) -> list[int]:
    """Row order whose consecutive `step_rows` slices (one optimizer step's rows: the global batch)
    hold rows of similar length, longest first, so any cut of a step into micro-batches keeps
    lengths together. Its length is rounded up to a multiple of `step_rows` (see the module
    docstring); empty for no rows.

    `window_steps` bounds how far a row can move from its shuffled position: sorting a window of
    64 steps removes most padding while keeping the data mixed.
    """
    if step_rows < 1:
        raise ValueError(f"step_rows must be at least 1, got {step_rows}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = step_rows * max(1, window_steps)
    steps: list[list[int]] = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i], reverse=True)
        steps.extend(chunk[i:i + step_rows] for i in range(0, len(chunk), step_rows))
    if steps and len(steps[-1]) < step_rows:
        missing = step_rows - len(steps[-1])
        others = [i for step in steps[:-1] for i in step]
        # Fewer rows than one step: the rows are repeated in turn.
        filler = rng.sample(others, missing) if len(others) >= missing else [order[k % len(order)] for k in range(missing)]
        steps[-1] = sorted(steps[-1] + filler, key=lambda i: lengths[i], reverse=True)
    rng.shuffle(steps)
    return [i for step in steps for i in step]


def row_length(row: dict) -> int:
    """A row's token count when it is pre-tokenised (conversations, cpuft.data.loss_mask), else a
    cheap stand-in (characters of its text): ordering needs only lengths that rank like token
    counts, not the tokenizer's exact numbers."""
    if "input_ids" in row:
        return len(row["input_ids"])
    if "messages" in row:
        return sum(len(str(m.get("content", ""))) for m in row["messages"])
    if "chosen" in row and "rejected" in row:  # a preference pair: TRL pads both to the longer one
        return len(str(row.get("prompt", ""))) + max(len(str(row["chosen"])), len(str(row["rejected"])))
    if "prompt" in row and "completion" in row:
        return len(str(row["prompt"])) + len(str(row["completion"]))
    return len(str(row.get("text", "")))


def order_by_length(dataset, step_rows: int, seed: int):
    """`dataset` (a datasets.Dataset of TRL rows) reordered by `length_grouped_order` for optimizer
    steps of `step_rows` rows (the plan's global batch); train it with a sequential sampler so the
    order holds."""
    lengths = [row_length(row) for row in dataset]
    return dataset.select(length_grouped_order(lengths, step_rows, seed))
