"""Process-level settings of device.py: device names, layouts by device, the allocator setting."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

ALLOCATE_AND_FREE = textwrap.dedent(
    """
    import resource, sys
    import torch
    from scvi_cli.device import retain_freed_memory
    applied = retain_freed_memory() if sys.argv[1] == "retain" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    def step():  # a few 36 MB tensors (above glibc's largest mmap threshold), made and freed
        blocks = [torch.empty(9_000_000).fill_(1.0) for _ in range(4)]
        return blocks[0] * blocks[1] + blocks[2]
    for _ in range(8):
        step()
    before = faults()
    step()
    print(applied, faults() - before)
    """
)


def _faults_per_allocation(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, mode], capture_output=True, text=True, check=True)
    applied, faults = out.stdout.split()
    return applied, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_retained_memory_is_reused_without_page_faults():
    _, plain = _faults_per_allocation("plain")
    applied, retained = _faults_per_allocation("retain")
    assert applied == "True"
    assert plain > 20_000  # every block was mapped afresh: ~9k pages faulted in per block
    assert retained < plain / 10


def test_retention_only_for_blocks_above_the_mmap_ceiling(monkeypatch):
    from scvi_cli import device

    calls = []
    monkeypatch.setattr(device, "retain_freed_memory", lambda: calls.append(1) or True)
    assert device.retain_memory_for_wide_minibatches(128, 9000) is False and not calls
    assert device.retain_memory_for_wide_minibatches(1024, 2000) is False and not calls
    assert device.retain_memory_for_wide_minibatches(1024, 9000) is True and calls == [1]
