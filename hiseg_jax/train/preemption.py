"""Preemption notices: stop training cleanly after a SIGTERM.

In a single process a SIGTERM handler sets a flag that the training loop polls
once per step. With several processes (after `jax.distributed.initialize`),
jax's preemption service receives the notice, and every process stops at the
same step through `multihost_utils.reached_preemption_sync_point`, so they all
save the same checkpoint.
"""

import signal
import threading
from types import FrameType
from typing import Optional

import jax
from absl import logging
from jax.experimental import multihost_utils


class PreemptionWatcher:
  """Context manager that reports whether training should stop and save.

  Usage:
    with PreemptionWatcher() as watcher:
      for step in ...:
        train_step()
        if watcher.should_stop(step):
          save_and_exit()
  """

  def __init__(self):
    """Creates a watcher (the handler is installed on `__enter__`)."""
    self._notice = threading.Event()
    self._previous_handler = None
    self._multiprocess = False

  def _on_sigterm(self, signum: int, frame: Optional[FrameType]) -> None:
    """Records the notice; the loop saves and exits at its next step."""
    del frame
    logging.warning('received signal %d: saving a checkpoint and stopping',
                    signum)
    self._notice.set()

  def __enter__(self) -> 'PreemptionWatcher':
    """Installs the SIGTERM handler (single process) and returns self."""
    self._multiprocess = jax.process_count() > 1
    if not self._multiprocess:
      self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    return self

  def __exit__(self, *exc_info) -> None:
    """Restores the previous SIGTERM handler."""
    if not self._multiprocess:
      signal.signal(signal.SIGTERM, self._previous_handler)

  def should_stop(self, step: int) -> bool:
    """Whether a preemption notice asks to save now and stop.

    Args:
      step: the number of completed steps (the same on every process).

    Returns:
      True once a SIGTERM has been received (agreed on by all processes when
      there are several).
    """
    if self._multiprocess:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._notice.is_set()
