r"""Train and evaluate a registered model from an ml_collections config.

    python -m hiseg_jax.main --config configs/aims.py:runlocal --workdir W \
        [--config.total_steps=2000 --config.seed=1 ...]

Writes W/checkpoints/ (orbax), W/metrics.jsonl, W/tensorboard/ and
W/eval/<step>/. Re-running the same command resumes from the latest checkpoint.
Overrides of unknown keys or of the wrong type fail while the flags are parsed;
the loaded config is then validated (hiseg_jax/config_validation.py) before
anything is built. For several hosts, run the same command on every host with
`--config.multihost=True`: each process first calls
`jax.distributed.initialize()`, which finds the coordinator and its process id
from the cluster (Cloud TPU, SLURM, Open MPI, Kubernetes; or
JAX_COORDINATOR_ADDRESS with a detectable cluster).
"""


import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from hiseg_jax import cli
from hiseg_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/aims.py:runlocal.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Work directory for checkpoints, metrics and evaluation.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list) -> None:
  """Validates the config, sets up jax.distributed if asked, and trains.

  Args:
    argv: leftover command-line arguments (none are accepted).

  Raises:
    app.UsageError: for positional arguments.
  """
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  cli.start(config)
  logging.info('jax %s, process %d of %d, %d local / %d global %s devices',
               jax.__version__, jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count(),
               jax.devices()[0].platform)
  logging.info('config:\n%s', config)
  trainer.train_and_evaluate(config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
