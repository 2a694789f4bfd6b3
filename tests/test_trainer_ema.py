"""The parameter moving average (`config.optim.ema_decay`) on the toy model.

Checked: the average follows ema <- r * ema + (1 - r) * params with
r = min(d, (1 + s) / (10 + s)) against a numpy replay of the raw parameters
(rtol 1e-6, float32); evaluation and `restore_variables` use it; it is saved
and restored, so a run resumed from a checkpoint ends with the same average
(rtol 1e-6); a bad decay and a request for an average the run did not keep fail.
"""

import os

import jax
import ml_collections
import numpy as np
import pytest

import trainer_toy
from hiseg_jax import config_validation
from hiseg_jax.train import metrics_writer
from hiseg_jax.train import sharding
from hiseg_jax.train import trainer

DECAY = 0.3  # reached at step 3: (1 + 3) / (10 + 3) > 0.3


def _config(ema_decay=DECAY, total_steps=8):
  config = trainer_toy.get_config()
  config.optim.ema_decay = ema_decay
  config.total_steps = total_steps
  config.eval_every = 0
  config.checkpoint_every = 4
  return config


def _flat(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_average_follows_the_formula():
  config = _config()
  training = trainer.build_training(config)
  state, step, mesh = training.state, training.train_step, training.mesh
  iterator = training.spec.make_train_iterator(config, '')
  expected = _flat(state.params)
  np.testing.assert_array_equal(_flat(state.ema_params)[0], expected[0])
  for s in range(6):
    batch = sharding.global_batch(next(iterator), sharding.batch_sharding(mesh),
                                  config.batch_size)
    state, _ = step(state, batch)
    rate = min(DECAY, (1 + s) / (10 + s))
    expected = [rate * e + (1 - rate) * p for e, p in zip(expected, _flat(state.params))]
    for got, want in zip(_flat(state.ema_params), expected):
      np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert trainer.eval_params(state) is state.ema_params
  # The average lags the raw parameters; it is not a copy of them.
  assert not np.allclose(_flat(state.ema_params)[0], _flat(state.params)[0])


def test_without_decay_no_average_is_kept():
  config = _config(ema_decay=0.0)
  training = trainer.build_training(config)
  state = training.state
  assert state.ema_params is None and training.abstract_state.ema_params is None
  assert trainer.eval_params(state) is state.params


def test_evaluation_uses_the_average_and_resume_restores_it(tmp_path):
  full_dir = str(tmp_path / 'full')
  final = trainer.train_and_evaluate(_config(), full_dir)
  module, ema_vars, step, mesh = trainer.restore_variables(_config(), full_dir)
  assert step == 8
  _, raw_vars, _, _ = trainer.restore_variables(_config(), full_dir, weights='params')
  _, ema_again, _, _ = trainer.restore_variables(_config(), full_dir, weights='ema')
  for a, b in zip(_flat(ema_vars), _flat(ema_again)):
    np.testing.assert_array_equal(a, b)
  on_ema = trainer_toy.evaluate(module, ema_vars, _config(), full_dir,
                                str(tmp_path / 'ema'), mesh)
  on_raw = trainer_toy.evaluate(module, raw_vars, _config(), full_dir,
                                str(tmp_path / 'raw'), mesh)
  assert final == on_ema and on_raw != on_ema
  records = metrics_writer.read_records(os.path.join(full_dir, 'metrics.jsonl'))
  assert [r['mse'] for r in records if r['split'] == 'eval'] == [on_ema['mse']]

  # Stopped after the step-4 checkpoint, then run on to step 8 in the same workdir.
  split_dir = str(tmp_path / 'split')
  trainer.train_and_evaluate(_config(total_steps=4), split_dir)
  trainer.train_and_evaluate(_config(), split_dir)
  _, resumed_vars, _, _ = trainer.restore_variables(_config(), split_dir)
  for got, want in zip(_flat(resumed_vars), _flat(ema_vars)):
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_bad_decay_and_missing_average_fail(tmp_path):
  for bad in (1.0, -0.1):
    with pytest.raises(ValueError, match=r'config\.optim\.ema_decay must be in \[0, 1\)'):
      config_validation.validate(_config(ema_decay=bad), ('model', 'data'))
  workdir = str(tmp_path / 'plain')
  trainer.train_and_evaluate(_config(ema_decay=0.0, total_steps=4), workdir)
  with pytest.raises(ValueError, match='ema_decay > 0'):
    trainer.restore_variables(_config(ema_decay=0.0), workdir, weights='ema')
  with pytest.raises(ValueError, match="weights must be one of"):
    trainer.restore_variables(_config(ema_decay=0.0), workdir, weights='average')
  raw = _config().to_dict()
  raw['optim']['ema_decay'] = '0.9'
  with pytest.raises(ValueError, match="config.optim.ema_decay must be a number, got '0.9'"):
    config_validation.validate(ml_collections.ConfigDict(raw), ('model', 'data'))
