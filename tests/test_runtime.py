"""The allocator settings (datafree.base.runtime): freed blocks of a step are reused by the next one."""
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT

# Allocate, touch and free an 8 MiB block five times; print whether the settings were applied and the
# page faults of the last four rounds (a reused block faults no page; a fresh mapping faults 2,048).
REUSE = """
import ctypes, resource
from datafree.base.runtime import tune_allocator
applied = tune_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
size = 8 << 20
def one_round():
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    one_round()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _reuse(**env) -> tuple[bool, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("DATAFREE_SYSTEM_MALLOC", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")}
    out = subprocess.run([sys.executable, "-c", REUSE], env=clean | env, cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="the settings are glibc malloc's")
def test_tuned_malloc_reuses_a_freed_block_where_glibc_defaults_map_it_again():
    applied, faults = _reuse()
    assert applied and faults < 200
    applied, faults = _reuse(DATAFREE_SYSTEM_MALLOC="1")  # the user's opt-out: glibc's defaults, which map the block again
    assert not applied and faults > 1500
    assert _reuse(MALLOC_TRIM_THRESHOLD_="1000000")[0] is False  # glibc's own variables set by the user win

