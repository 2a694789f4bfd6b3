"""Keep freed host memory in the process, so XLA's CPU buffers are not re-faulted every step.

On Linux with glibc, `malloc` serves every request above its mmap threshold (at most 32 MiB)
with a fresh `mmap` and returns it to the kernel with `munmap` on `free`. XLA's CPU backend
allocates each execution's temporary buffer (about 300 MB for the AIMS runlocal train step)
that way, so every step maps it anew and the kernel zero-fills it one 4 KiB page fault at a
time: on a 2-core machine about a fifth of the step went to page faults and up to half of the
CPU time to the kernel. `keep_freed_memory` tells glibc to serve large blocks from its heap
and keep freed memory there, so the next step reuses the same, already-mapped pages.

The price is that the process's resident memory stays at its peak instead of shrinking after
the largest step; a training or evaluation process reaches that peak every step anyway. The
call changes nothing on other platforms or C libraries, and GPU/TPU device memory is not
affected.
"""

import ctypes
import ctypes.util
import sys

from absl import logging

# mallopt parameter numbers from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
# The largest trim threshold mallopt accepts (an int): freed heap top is never given back.
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
  """Makes glibc malloc keep large freed blocks for reuse instead of unmapping them.

  Sets `M_MMAP_MAX = 0` (large blocks come from the heap, not from their own mmap) and
  `M_TRIM_THRESHOLD` to its maximum (freed memory at the heap top is kept). Safe to call
  more than once.

  Returns:
    True when glibc accepted both settings; False on platforms without glibc (nothing is
    changed there).
  """
  if not sys.platform.startswith('linux'):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    logging.info('no glibc mallopt: freed host memory is handled by the C library defaults')
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  mallopt.restype = ctypes.c_int
  accepted = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _NEVER_TRIM) == 1
  if not accepted:
    logging.warning('glibc mallopt refused the settings: large buffers are re-mapped per step')
  return accepted
