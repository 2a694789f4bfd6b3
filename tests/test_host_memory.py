"""keep_freed_memory: a freed large block is reused without new page faults (Linux/glibc only)."""

import subprocess
import sys

import pytest

# Allocates, fills and frees a 64 MiB block with glibc malloc five times after one warm-up
# cycle, and prints the minor page faults of the five cycles (16,384 pages each).
_CYCLES = r'''
import ctypes, resource, sys
from hiseg_jax import host_memory
if sys.argv[1] == 'keep':
  assert host_memory.keep_freed_memory()
  assert host_memory.keep_freed_memory()  # a second call is harmless
libc = ctypes.CDLL('libc.so.6')
libc.malloc.argtypes, libc.malloc.restype = (ctypes.c_size_t,), ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
size = 64 << 20
def cycle():
  block = libc.malloc(size)
  ctypes.memset(block, 1, size)
  libc.free(block)
cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''
_PAGES = 5 * (64 << 20) // 4096


def _faults(mode: str) -> int:
  """Runs the cycles in a fresh interpreter and returns their minor page faults."""
  out = subprocess.run([sys.executable, '-c', _CYCLES, mode], check=True,
                       capture_output=True, text=True).stdout
  return int(out.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='glibc mallopt is Linux-only')
def test_freed_block_is_reused_without_page_faults():
  kept = _faults('keep')
  default = _faults('default')
  # With the settings the block stays mapped: at most 1% of its pages fault again. Without
  # them glibc unmaps it on every free (control: it must fault more than with them).
  assert kept <= _PAGES // 100, (kept, _PAGES)
  assert default > kept, (default, kept)

