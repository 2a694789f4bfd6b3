"""Pretrained weights through `ModelSpec.pretrained` and the trainer's strict replacement."""

import dataclasses

import jax
import numpy as np
import pytest

from hiseg_jax.train import optim
from hiseg_jax.train import sharding
from hiseg_jax.train import trainer
from tests import trainer_toy


def _params(rng_seed=0):
  rng = np.random.default_rng(rng_seed)
  return {'conv': {'kernel': rng.normal(size=(3, 3, 3, 8)).astype(np.float32),
                   'bias': rng.normal(size=(8,)).astype(np.float32)},
          'norm': {'scale': rng.normal(size=(8,)).astype(np.float32),
                   'bias': rng.normal(size=(8,)).astype(np.float32)}}


def _state(pretrained):
  config = trainer_toy.get_config()
  spec = dataclasses.replace(trainer_toy.SPEC, pretrained=lambda config: pretrained)
  module = spec.build(config)
  tx, _ = optim.make_optimizer(config.optim, spec.param_group, spec.no_weight_decay)
  mesh = sharding.make_mesh(dict(config.mesh))
  return trainer.create_train_state(module, spec, config, tx, mesh)[0]


def test_pretrained_subtree_replaces_the_initialisation_and_nothing_else():
  weights = _params()
  random_init = _state({})
  state = _state({'backbone': weights})
  got = jax.tree.map(np.asarray, state.params['backbone'])
  jax.tree.map(np.testing.assert_array_equal, got, weights)  # exact copy
  for name in state.params:
    if name != 'backbone':
      jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.params[name]),
                   jax.tree.map(np.asarray, random_init.params[name]))
  assert not np.array_equal(np.asarray(random_init.params['backbone']['conv']['kernel']),
                            weights['conv']['kernel'])


def test_pretrained_mismatch_names_every_problem():
  bad = _params()
  bad['conv']['kernel'] = bad['conv']['kernel'][..., :4]
  del bad['norm']['scale']
  bad['extra'] = {'w': np.zeros(2, np.float32)}
  with pytest.raises(ValueError) as e:
    _state({'backbone': bad})
  msg = str(e.value)
  assert 'missing norm/scale' in msg and 'unexpected extra/w' in msg
  assert 'conv/kernel: shape (3, 3, 3, 4) != (3, 3, 3, 8)' in msg
  with pytest.raises(ValueError, match="unknown parameter groups \\['text'\\]"):
    _state({'text': {}})
