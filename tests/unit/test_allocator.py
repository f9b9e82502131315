"""keep_freed_cpu_memory: large freed blocks are reused instead of being faulted in again."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from medseg.machine import keep_freed_cpu_memory


def _faults_for_reallocations(n: int, numel: int) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.empty(numel, dtype=torch.float32)
        t.fill_(1.0)  # touch every page
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc allocator setting")
def test_freed_large_blocks_are_reused_without_page_faults():
    assert keep_freed_cpu_memory() is True
    assert keep_freed_cpu_memory() is True  # idempotent
    numel = 64 * 2**20 // 4  # 64 MiB: above glibc's largest mmap threshold
    _faults_for_reallocations(10, numel)  # the heap grows to its working size first
    pages_per_block = 64 * 2**20 // 4096
    faults = _faults_for_reallocations(5, numel)
    # without the setting every reallocation maps fresh pages: >= 5 x 16384 faults
    assert faults < pages_per_block, faults
