"""Mesh construction, state shardings, and one training step on 8 devices.

The 8-device check runs in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be set
before jax starts, and other tests import jax first). It compares one step of
the toy model on a 1-device mesh with an 8-way data mesh and a 4 x 2
data x fsdp mesh: loss, every gradient and every updated parameter agree to
rtol 1e-5 / atol 1e-6.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from hiseg_jax.train import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import json
import jax
import numpy as np
import trainer_toy
from hiseg_jax import registry
from hiseg_jax.train import optim, sharding, trainer

config = trainer_toy.get_config()
spec = registry.get(trainer_toy.NAME)
module = spec.build(config)
tx, schedule = optim.make_optimizer(config.optim, spec.param_group,
                                    spec.no_weight_decay)
local_batch = next(spec.make_train_iterator(config, None))
meshes = {
    'one': sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1]),
    'data8': sharding.make_mesh({'data': -1, 'fsdp': 1}),
    'data4_fsdp2': sharding.make_mesh({'data': 4, 'fsdp': 2}),
}
out = {'devices': jax.device_count()}
for name, mesh in meshes.items():
  state, abstract = trainer.create_train_state(module, spec, config, tx, mesh)
  batch = sharding.global_batch(local_batch, sharding.batch_sharding(mesh),
                                config.batch_size)
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract)
  loss_and_grads = jax.jit(
      trainer.make_loss_and_grads(module, spec, config),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)))
  loss, terms, grads = loss_and_grads(state, batch)
  step = trainer.jit_train_step(
      trainer.make_train_step(module, spec, config, tx, schedule), abstract,
      mesh)
  new_state, metrics = step(state, batch)
  flat = lambda tree: {'/'.join(optim.path_names(p)): np.asarray(v).tolist()
                       for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
  out[name] = {
      'loss': float(loss), 'step_loss': float(metrics['loss']),
      'grads': flat(grads), 'params': flat(new_state.params),
      'image_shards': sorted({s.data.shape[0]
                              for s in batch['image'].addressable_shards}),
      'kernel_spec': list(abstract.params['backbone']['conv']['kernel']
                          .sharding.spec),
  }
print('RESULT' + json.dumps(out))
'''


def test_make_mesh_sizes():
  mesh = sharding.make_mesh({'data': -1, 'fsdp': 1})
  assert dict(mesh.shape) == {'data': jax.device_count(), 'fsdp': 1}
  with pytest.raises(ValueError, match='exactly the axes'):
    sharding.make_mesh({'data': -1, 'model': 1})
  with pytest.raises(ValueError, match='needs 4 devices'):
    sharding.make_mesh({'data': 2, 'fsdp': 2}, jax.devices()[:1])
  with pytest.raises(ValueError, match='at most one -1'):
    sharding.make_mesh({'data': -1, 'fsdp': -1})


def test_global_batch_rejects_wrong_leading_dimension():
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1])
  with pytest.raises(ValueError, match="'image' has shape \\(3, 2\\)"):
    sharding.global_batch({'image': np.zeros((3, 2))},
                          sharding.batch_sharding(mesh), 4)


def test_one_step_equal_on_one_and_eight_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]))
  result = subprocess.run([sys.executable, '-c', _SCRIPT], env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0]
  out = json.loads(line[len('RESULT'):])
  assert out['devices'] == 8
  one = out['one']
  assert one['image_shards'] == [8]
  assert out['data8']['image_shards'] == [1]
  assert out['data4_fsdp2']['image_shards'] == [1]
  # The conv kernel [3, 3, 3, 8] is split over 'fsdp' along its last axis.
  assert out['data4_fsdp2']['kernel_spec'] == [None, None, None, 'fsdp']
  for name in ('data8', 'data4_fsdp2'):
    other = out[name]
    np.testing.assert_allclose(other['loss'], one['loss'], rtol=1e-5)
    np.testing.assert_allclose(other['step_loss'], one['loss'], rtol=1e-5)
    assert other['grads'].keys() == one['grads'].keys()
    for key in one['grads']:
      np.testing.assert_allclose(other['grads'][key], one['grads'][key],
                                 rtol=1e-5, atol=1e-6, err_msg=f'{name} {key}')
      np.testing.assert_allclose(other['params'][key], one['params'][key],
                                 rtol=1e-5, atol=1e-6, err_msg=f'{name} {key}')
