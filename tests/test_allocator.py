"""What glibc's mallopt does to a training step's allocation pattern (cpuft.hardware.allocator).

Each case runs in its own process (mallopt is process-wide): four 40 MiB activations, each above
glibc's largest mmap threshold (32 MiB), filled and freed, eight steps in a row. Plain glibc
mmaps them anew every step: every page faults in again. With `keep_freed_memory` the heap keeps
them; torch's 64-byte-aligned requests fit the freed chunks only once the heap has grown around
them, so the first steps still fault (measured [40982, 10240, 40960, 0, 0, 0, 0, 0] here) and
then none do.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

PAGES_PER_STEP = 4 * 40 * 2**20 // 4096
SCRIPT = """
import resource, sys
import torch
if sys.argv[1] == "keep":
    from cpuft.hardware.allocator import keep_freed_memory
    assert keep_freed_memory()
torch.set_num_threads(1)
faults = []
for step in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    activations = [torch.empty(10 * 2**20).fill_(1.0) for _ in range(4)]  # 4 x 40 MiB of fp32
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    del activations
print(*faults)
"""


def _faults_per_step(mode: str) -> list[int]:
    proc = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [int(n) for n in proc.stdout.split()[-8:]]


@pytest.mark.slow
def test_plain_glibc_faults_every_step_in_and_kept_memory_at_most_every_other():
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc mallopt is Linux-only")
    plain = _faults_per_step("plain")
    assert all(n >= 0.9 * PAGES_PER_STEP for n in plain), plain  # a fresh mmap each time
    kept = _faults_per_step("keep")
    # Which of the first steps reuse the heap depends on the allocation history.
    assert sum(kept[1:]) <= 0.8 * sum(plain[1:]), (kept, plain)
    assert sum(kept[4:]) <= 0.05 * 4 * PAGES_PER_STEP, kept  # settled: the heap is reused
