"""Checkpointer: state + grain iterator round trip, keep-N, strict restore."""

import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from hiseg_jax.train import checkpoint


def _iterator():
  dataset = (grain.MapDataset.range(20).shuffle(seed=7).repeat()
             .map(lambda i: {'x': np.full((2,), i, np.int32)}))
  return iter(dataset.to_iter_dataset().batch(3))


def _state(scale=1.0):
  params = {'w': jnp.arange(6.0).reshape(2, 3) * scale, 'b': jnp.ones(3)}
  tx = optax.adamw(1e-3)
  return {'step': jnp.array(5, jnp.int32), 'params': params,
          'opt_state': tx.init(params)}


def _abstract(state):
  return jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
      state)


@pytest.mark.parametrize('async_save', [True, False])
def test_round_trip_restores_state_and_iterator_position(tmp_path, async_save):
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoint.Checkpointer(directory, max_to_keep=2,
                                         async_save=async_save)
  iterator = _iterator()
  next(iterator)
  next(iterator)
  state = _state(2.0)
  checkpointer.save(2, state, iterator)
  expected_next = [next(iterator)['x'] for _ in range(3)]
  checkpointer.close()

  reopened = checkpoint.Checkpointer(directory, max_to_keep=2,
                                     async_save=async_save)
  assert reopened.latest_step() == 2
  restored, restored_iterator = reopened.restore(2, _abstract(_state()),
                                                 _iterator())
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  for want in expected_next:
    np.testing.assert_array_equal(next(restored_iterator)['x'], want)
  reopened.close()


def test_keeps_last_n_and_ignores_unfinished_saves(tmp_path):
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoint.Checkpointer(directory, max_to_keep=2,
                                         async_save=True)
  iterator = _iterator()
  for step in (1, 2, 3, 4):
    checkpointer.save(step, _state(float(step)), iterator)
  checkpointer.wait()
  assert sorted(int(d) for d in os.listdir(directory)) == [3, 4]
  # A save killed half-way leaves only orbax's temporary directory.
  os.makedirs(os.path.join(directory, '9.orbax-checkpoint-tmp', 'state'))
  checkpointer.close()
  assert checkpoint.Checkpointer(directory, 2, True).latest_step() == 4


def test_strict_restore_lists_missing_unexpected_and_mismatched(tmp_path):
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoint.Checkpointer(directory, max_to_keep=1,
                                         async_save=False)
  checkpointer.save(1, _state(), _iterator())
  target = _abstract(_state())
  target['params']['extra'] = jax.ShapeDtypeStruct((4,), jnp.float32)
  del target['params']['b']
  target['params']['w'] = jax.ShapeDtypeStruct((3, 2), jnp.float32)
  target['opt_state'] = optax.adamw(1e-3).init(
      {'w': jnp.zeros((3, 2)), 'extra': jnp.zeros(4)})
  with pytest.raises(ValueError) as error:
    checkpointer.restore(1, target, _iterator())
  message = str(error.value)
  assert f'checkpoint {directory}/1 does not match the model' in message
  assert 'missing in checkpoint: params/extra (4,)' in message
  assert 'unexpected in checkpoint: params/b (3,)' in message
  assert 'shape mismatch: params/w checkpoint (2, 3) vs model (3, 2)' in message
  checkpointer.close()


def test_restore_state_only_and_missing_step(tmp_path):
  directory = str(tmp_path / 'ckpt')
  checkpointer = checkpoint.Checkpointer(directory, max_to_keep=2,
                                         async_save=False)
  checkpointer.save(3, _state(3.0), _iterator())
  restored = checkpointer.restore_state(3, _abstract(_state()))
  jax.tree.map(np.testing.assert_array_equal, restored, _state(3.0))
  with pytest.raises(ValueError, match=r'no checkpoint .*/4; complete '
                     r'checkpoints: \[3\]'):
    checkpointer.restore_state(4, _abstract(_state()))
  checkpointer.close()
