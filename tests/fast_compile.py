"""Cheaper XLA compiles for tests whose time is compile-bound (the trainer runs, model passes)."""

import contextlib

import jax


@contextlib.contextmanager
def fast_compile():
  """Compiles without most XLA optimisations inside the block (`jax_disable_most_optimizations`).

  Programs compiled inside run slower but compile two to three times faster on CPU; compare
  numbers only between programs compiled the same way. The flag is restored on exit.

  Yields:
    None.
  """
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  try:
    yield
  finally:
    jax.config.update('jax_disable_most_optimizations', previous)
