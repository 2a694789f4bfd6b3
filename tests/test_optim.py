"""The optimiser against a NumPy transcription of torch-style AdamW.

Reference per update t (0-based): clip all gradients to global norm c, then for
each parameter m = b1 m + (1 - b1) g, v = b2 v + (1 - b2) g^2,
u = (m / (1 - b1^(t+1))) / (sqrt(v / (1 - b2^(t+1))) + eps),
p -= lr(t) * mult_group * (u + wd * decay_p * p). Tolerance rtol 1e-5.
"""

import ml_collections
import numpy as np
import optax
import pytest

from hiseg_jax import config_validation
from hiseg_jax import registry
from hiseg_jax.train import optim


def _params(rng):
  shapes = {
      'backbone': {'conv': {'kernel': (3, 3, 2, 4), 'bias': (4,)},
                   'norm': {'scale': (4,), 'bias': (4,)}},
      'head': {'kernel': (4, 2), 'bias': (2,)},
      'task_embed': {'embedding': (5, 2)},
      'decoder': {'pos_embed': (6, 2), 'proj': {'kernel': (2, 2)}},
  }
  return _map(lambda s: rng.normal(size=s).astype(np.float32), shapes,
              is_leaf=lambda x: isinstance(x, tuple))


def _map(fn, tree, is_leaf=lambda x: not isinstance(x, dict)):
  if is_leaf(tree):
    return fn(tree)
  return {k: _map(fn, v, is_leaf) for k, v in tree.items()}


def _flat(tree, path=()):
  if not isinstance(tree, dict):
    return {path: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, path + (k,)))
  return out


def _config(**overrides):
  config = config_validation.base_config().optim
  config.lr = 1e-2
  config.warmup_steps = 3
  config.decay_steps = (4,)
  config.decay_factor = 0.1
  config.weight_decay = 0.05
  config.clip_norm = 1.0
  config.lr_multipliers = ml_collections.ConfigDict({'backbone': 0.1,
                                                     'decoder': 0.5})
  for key, value in overrides.items():
    config[key] = value
  return config


def _reference(params, grads_per_step, config, mult, decay):
  params = {k: v.astype(np.float64) for k, v in _flat(params).items()}
  m = {k: np.zeros_like(v) for k, v in params.items()}
  v = {k: np.zeros_like(x) for k, x in params.items()}
  for t, grads in enumerate(grads_per_step):
    grads = {k: g.astype(np.float64) for k, g in _flat(grads).items()}
    norm = np.sqrt(sum(np.sum(g ** 2) for g in grads.values()))
    if config.clip_norm > 0 and norm > config.clip_norm:
      grads = {k: g * config.clip_norm / norm for k, g in grads.items()}
    lr = config.lr * min(1.0, (t + 1) / config.warmup_steps)
    lr *= config.decay_factor ** sum(t >= b for b in config.decay_steps)
    for k in params:
      m[k] = config.b1 * m[k] + (1 - config.b1) * grads[k]
      v[k] = config.b2 * v[k] + (1 - config.b2) * grads[k] ** 2
      mhat = m[k] / (1 - config.b1 ** (t + 1))
      vhat = v[k] / (1 - config.b2 ** (t + 1))
      update = mhat / (np.sqrt(vhat) + config.eps)
      update += config.weight_decay * decay[k] * params[k]
      params[k] = params[k] - lr * mult[k] * update
  return params


def test_schedule_warmup_and_step_decay():
  schedule = optim.lr_schedule(1e-4, 10, (28000, 33000), 0.1)
  for count, want in [(0, 1e-5), (4, 5e-5), (9, 1e-4), (10, 1e-4),
                      (27999, 1e-4), (28000, 1e-5), (32999, 1e-5),
                      (33000, 1e-6), (35999, 1e-6)]:
    np.testing.assert_allclose(float(schedule(count)), want, rtol=1e-6,
                               err_msg=f'count {count}')
  np.testing.assert_allclose(float(optim.lr_schedule(1e-3, 0, (), 0.1)(0)),
                             1e-3)
  with pytest.raises(ValueError, match='increasing'):
    optim.lr_schedule(1e-4, 0, (5, 3), 0.1)


def test_decay_mask_and_groups():
  params = _params(np.random.default_rng(0))
  mask = _flat(optim.decay_mask(params, registry.default_no_weight_decay))
  decayed = sorted('/'.join(k) for k, v in mask.items() if v)
  assert decayed == ['backbone/conv/kernel', 'decoder/proj/kernel',
                     'head/kernel']
  counts = optim.check_multipliers(params, {'backbone': 0.1},
                                   registry.default_param_group)
  assert counts == {'backbone': 84, 'head': 10, 'task_embed': 10,
                    'decoder': 16}
  with pytest.raises(ValueError, match="names group 'text_encoder'"):
    optim.check_multipliers(params, {'text_encoder': 0.1},
                            registry.default_param_group)


@pytest.mark.parametrize('clip_norm', [1.0, 0.0])
def test_adamw_with_groups_matches_reference(clip_norm):
  rng = np.random.default_rng(1)
  params = _params(rng)
  config = _config(clip_norm=clip_norm)
  tx, _ = optim.make_optimizer(config, registry.default_param_group,
                               registry.default_no_weight_decay)
  grads_per_step = [_map(lambda p: (3.0 * rng.normal(size=p.shape))
                         .astype(np.float32), params) for _ in range(6)]
  state = tx.init(params)
  got = params
  for grads in grads_per_step:
    updates, state = tx.update(grads, state, got)
    got = optax.apply_updates(got, updates)
  mult = {k: {'backbone': 0.1, 'decoder': 0.5}.get(k[0], 1.0)
          for k in _flat(params)}
  decay = {k: float(v) for k, v in _flat(
      optim.decay_mask(params, registry.default_no_weight_decay)).items()}
  want = _reference(params, grads_per_step, config, mult, decay)
  for key, value in _flat(got).items():
    np.testing.assert_allclose(np.asarray(value), want[key], rtol=1e-5,
                               atol=1e-7, err_msg='/'.join(key))


def test_backbone_gets_tenth_of_update_and_no_decay_on_norms():
  params = {'backbone': {'kernel': np.ones((2, 2), np.float32),
                         'norm': {'scale': np.ones((2,), np.float32)}},
            'head': {'kernel': np.ones((2, 2), np.float32),
                     'embedding': np.ones((2, 2), np.float32)}}
  config = _config(warmup_steps=0, decay_steps=(), clip_norm=0.0)
  tx, _ = optim.make_optimizer(config, registry.default_param_group,
                               registry.default_no_weight_decay)
  grads = _map(np.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first update of a constant gradient is 1 (up to eps and float32
  # bias correction, hence rtol 1e-5); decay adds wd * p on kernels only; the
  # backbone's whole update is scaled by 0.1.
  lr, wd = config.lr, config.weight_decay
  np.testing.assert_allclose(updates['head']['kernel'], -lr * (1 + wd),
                             rtol=1e-5)
  np.testing.assert_allclose(updates['head']['embedding'], -lr, rtol=1e-5)
  np.testing.assert_allclose(updates['backbone']['kernel'],
                             -0.1 * lr * (1 + wd), rtol=1e-5)
  np.testing.assert_allclose(updates['backbone']['norm']['scale'], -0.1 * lr,
                             rtol=1e-5)
  zero = _map(np.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates['head']['kernel'], -lr * wd, rtol=1e-5)
  np.testing.assert_array_equal(updates['head']['embedding'], 0.0)
  np.testing.assert_array_equal(updates['backbone']['norm']['scale'], 0.0)
