"""Tile sizes for CPU work done in chunks: small enough that no temporary leaves the allocator's heap.

glibc serves an allocation larger than its mmap threshold (128 KiB, rising by itself up to
32 MiB) with a fresh mmap and hands it back on free, so every use faults its pages in again and
the kernel zeroes them. TRL's chunked lm_head + loss works in [tokens, 32768] fp32 tiles, each
with several temporaries that size: at Qwen2.5-0.5B's vocabulary, 512 tokens took 1.3 M minor
page faults and ~5 s of system time per forward+backward on a 2-core AVX2 EPYC; in tiles of
<= 1 M elements (4 MiB fp32) it took 2 faults and 0.02 s (docs/speed.md).
"""

from __future__ import annotations

# Elements in one lm_head tile: 4 MiB in fp32, under glibc's mmap threshold once it has risen.
LM_HEAD_TILE_ELEMENTS = 1 << 20
# TRL's kernel works on at most this many tokens at a time (trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE).
KERNEL_TOKEN_CHUNK = 4096
MIN_VOCAB_CHUNK = 256
MAX_VOCAB_CHUNK = 32768


def lm_head_vocab_chunk(tokens: int) -> int:
    """Vocabulary columns per lm_head tile for `tokens` rows: a power of two with
    rows x columns <= LM_HEAD_TILE_ELEMENTS, between MIN_VOCAB_CHUNK and MAX_VOCAB_CHUNK."""
    rows = max(1, min(tokens, KERNEL_TOKEN_CHUNK))
    chunk = MIN_VOCAB_CHUNK
    while chunk * 2 * rows <= LM_HEAD_TILE_ELEMENTS and chunk * 2 <= MAX_VOCAB_CHUNK:
        chunk *= 2
    return chunk
