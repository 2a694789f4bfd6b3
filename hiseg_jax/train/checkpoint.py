"""Checkpoints of the train state and the grain iterator state (orbax).

A checkpoint `<directory>/<step>/` holds two items: `state` (the train state,
saved with orbax's StandardSave, sharded arrays written by every process) and
`data` (the grain iterator position, one JSON file per process, written by
grain's orbax handler). Orbax writes into a temporary directory and renames it
once every item is complete, so a checkpoint directory is never half written; a
run killed mid-save leaves only a temporary directory that is ignored. Saves of
the train state are asynchronous when enabled (the arrays are copied to host
before `save` returns, so the caller may donate them); the iterator position is
recorded synchronously, so it matches the saved step. Restoring is strict: the
checkpoint must hold exactly the arrays of the target state, with the same
shapes, or the error lists the missing, unexpected and mismatched names.
"""

import os
from typing import Any, List, Optional, Tuple

import grain.checkpoint as grain_checkpoint
import jax
import orbax.checkpoint as ocp

from hiseg_jax.train import optim


def _named_shapes(tree: Any) -> dict:
  """Maps '/'-joined leaf paths to shapes."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {'/'.join(optim.path_names(path)): tuple(leaf.shape)
          for path, leaf in leaves}


def compare_trees(saved: Any, target: Any) -> List[str]:
  """Lists the differences between a saved tree and the target tree.

  Args:
    saved: the checkpoint's array metadata tree (anything with `.shape` leaves).
    target: the state the caller restores into (arrays or shape structs).

  Returns:
    Human-readable lines naming missing arrays (in the target, not saved),
    unexpected arrays (saved, not in the target) and shape mismatches; empty
    when the trees agree.
  """
  saved_shapes = _named_shapes(saved)
  target_shapes = _named_shapes(target)
  problems = []
  for name in sorted(set(target_shapes) - set(saved_shapes)):
    problems.append(f'missing in checkpoint: {name} {target_shapes[name]}')
  for name in sorted(set(saved_shapes) - set(target_shapes)):
    problems.append(f'unexpected in checkpoint: {name} {saved_shapes[name]}')
  for name in sorted(set(saved_shapes) & set(target_shapes)):
    if saved_shapes[name] != target_shapes[name]:
      problems.append(f'shape mismatch: {name} checkpoint '
                      f'{saved_shapes[name]} vs model {target_shapes[name]}')
  return problems


class Checkpointer:
  """Saves and restores (train state, data iterator) pairs in one directory.

  Attributes:
    directory: the checkpoint root, e.g. `W/checkpoints`.
  """

  def __init__(self, directory: str, max_to_keep: int, async_save: bool):
    """Opens (creating if needed) the checkpoint directory.

    Args:
      directory: the checkpoint root.
      max_to_keep: how many of the latest checkpoints to keep.
      async_save: write the train state in a background thread.
    """
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'data': grain_checkpoint.CheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    """Returns the newest complete checkpoint's step, or None if there is none.

    Returns:
      The step or None.
    """
    return self._manager.latest_step()

  def save(self, step: int, state: Any, data_iterator: Any) -> None:
    """Starts saving a checkpoint at `step` (see `wait`).

    Args:
      step: the number of completed training steps.
      state: the train state (a tree of jax arrays).
      data_iterator: the grain iterator, positioned after `step` batches.
    """
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain_checkpoint.CheckpointSave(data_iterator)),
        force=True)

  def all_steps(self) -> List[int]:
    """Returns the steps of every complete checkpoint, oldest first.

    Returns:
      The steps.
    """
    return sorted(self._manager.all_steps())

  def _check(self, step: int, abstract_state: Any) -> None:
    """Raises unless `step` exists and matches the target state exactly."""
    if step not in self._manager.all_steps():
      raise ValueError(f'no checkpoint {self.directory}/{step}; complete '
                       f'checkpoints: {self.all_steps()}')
    saved = self._manager.item_metadata(step)['state'].tree
    problems = compare_trees(saved, abstract_state)
    if problems:
      raise ValueError(
          f'checkpoint {self.directory}/{step} does not match the model:\n  '
          + '\n  '.join(problems))

  def restore(self, step: int, abstract_state: Any,
              data_iterator: Any) -> Tuple[Any, Any]:
    """Restores the train state and the iterator position at `step`, strictly.

    Args:
      step: a complete checkpoint's step.
      abstract_state: the target state as `jax.ShapeDtypeStruct`s carrying
        the shardings to restore into.
      data_iterator: a fresh grain iterator of the same pipeline; its position
        is set from the checkpoint.

    Returns:
      (state, data_iterator) restored.

    Raises:
      ValueError: if there is no such checkpoint, or if its arrays differ from
        the target's, listing every missing, unexpected and mismatched name.
    """
    self._check(step, abstract_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain_checkpoint.CheckpointRestore(data_iterator)))
    return restored['state'], restored['data']

  def restore_state(self, step: int, abstract_state: Any) -> Any:
    """Restores only the train state at `step` (e.g. for evaluation), strictly.

    Args:
      step: a complete checkpoint's step.
      abstract_state: as in `restore`.

    Returns:
      The train state.

    Raises:
      ValueError: as in `restore`.
    """
    self._check(step, abstract_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))
    return restored['state']

  def wait(self) -> None:
    """Blocks until every started save is complete on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()
