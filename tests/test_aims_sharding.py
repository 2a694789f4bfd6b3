"""One AIMS training step on an 8-way data mesh equals the step on one device.

Runs in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (the flag must be
set before jax starts). The AIMS loss matches on the host through `jax.pure_callback`, so this
also checks that the callback sees the whole global batch under SPMD partitioning. The loss and its
terms agree to rtol 1e-4; every gradient array agrees to rtol 1e-4 with an absolute tolerance of
1e-3 of that array's largest magnitude (float32; the sharded reductions sum in another order, which
moves near-zero entries by a few 1e-6).
"""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import json, sys
import jax
import numpy as np
import aims_micro
from hiseg_jax import registry
from hiseg_jax.train import optim, sharding, trainer

config = aims_micro.get_config()
spec = registry.get('aims')
module = spec.build(config)
tx, _ = optim.make_optimizer(config.optim, spec.param_group, spec.no_weight_decay)
local_batch = next(spec.make_train_iterator(config, sys.argv[1]))
out = {'devices': jax.device_count()}
meshes = {'one': sharding.make_mesh({'data': 1, 'fsdp': 1}, jax.devices()[:1]),
          'data8': sharding.make_mesh({'data': -1, 'fsdp': 1})}
for name, mesh in meshes.items():
  state, abstract = trainer.create_train_state(module, spec, config, tx, mesh)
  batch = sharding.global_batch(local_batch, sharding.batch_sharding(mesh), config.batch_size)
  loss_and_grads = jax.jit(
      trainer.make_loss_and_grads(module, spec, config),
      in_shardings=(jax.tree.map(lambda a: a.sharding, abstract), sharding.batch_sharding(mesh)))
  loss, terms, grads = loss_and_grads(state, batch)
  out[name] = {
      'loss': float(loss),
      'terms': {k: float(v) for k, v in terms.items()},
      'grads': {'/'.join(optim.path_names(p)): np.asarray(v).ravel().tolist()
                for p, v in jax.tree_util.tree_flatten_with_path(grads)[0]},
      'shards': sorted({s.data.shape[0] for s in batch['image'].addressable_shards}),
  }
print('RESULT' + json.dumps(out))
'''


def test_aims_step_equal_on_one_and_eight_devices(tmp_path):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]))
  result = subprocess.run([sys.executable, '-c', _SCRIPT, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  line = [l for l in result.stdout.splitlines() if l.startswith('RESULT')][0]
  out = json.loads(line[len('RESULT'):])
  assert out['devices'] == 8
  one, eight = out['one'], out['data8']
  assert one['shards'] == [8] and eight['shards'] == [1]
  np.testing.assert_allclose(eight['loss'], one['loss'], rtol=1e-4)
  for key, value in one['terms'].items():
    np.testing.assert_allclose(eight['terms'][key], value, rtol=1e-4, atol=1e-6, err_msg=key)
  assert eight['grads'].keys() == one['grads'].keys()
  # Per leaf 1e-3 of its largest entry; leaves whose gradient is mathematically zero (attention
  # key biases: the softmax ignores a constant added to a row) hold only float32 rounding noise
  # of the sums that cancel, so the floor scales with the model's largest gradient entry.
  largest = max(float(np.max(np.abs(value))) for value in one['grads'].values())
  for key, value in one['grads'].items():
    atol = max(1e-3 * float(np.max(np.abs(value))), 1e-6 * largest)
    np.testing.assert_allclose(eight['grads'][key], value, rtol=1e-4, atol=atol, err_msg=key)
