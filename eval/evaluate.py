r"""Evaluates a checkpoint: result files and metrics.json in a folder.

    python -m eval.evaluate --config configs/aims.py:runlocal --workdir W \
        [--step N] [--weights ema|params] --out DIR [--config.eval.top_k=50 ...]

Restores the train state of `W/checkpoints/<N>` (the latest complete checkpoint
when --step is not given) into the model the config builds, runs the model's
evaluation (`ModelSpec.evaluate`, with its progress bar) on the configured
evaluation datasets, and writes its result files (for AIMS, per subset the
class-agnostic COCO ground truth and results of each level) and `metrics.json`
into DIR. The metrics are also printed to stdout as one line of JSON. The
config is parsed and validated exactly as by `python -m hiseg_jax.main`
(overrides of unknown keys or of the wrong type fail while the flags are
parsed); `W` is also where the model finds the data it prepared in training
(e.g. the synthetic default in `W/data/synthetic`). A workdir without
checkpoints, or a --step that was not saved, ends the command with exit status
1 and a message listing the checkpoints there are.

The parameters evaluated are those the trainer evaluates: their moving average
when the run kept one (`config.optim.ema_decay` > 0), else the raw parameters.
--weights=params evaluates the raw parameters of such a run (to compare the
two); --weights=ema asks for the average and fails for a run without one.
"""

import json
import os
import sys

import jax
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from eval import writers
from hiseg_jax import cli
from hiseg_jax.train import trainer

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and argument, e.g. configs/aims.py:runlocal.',
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'The training run directory (with checkpoints/).')
_STEP = flags.DEFINE_integer(
    'step', None, 'Checkpoint step to evaluate; the latest when not given.')
_WEIGHTS = flags.DEFINE_enum(
    'weights', '', ('',) + trainer.WEIGHTS,
    "Parameters to evaluate: '' those the trainer evaluates, 'ema' the moving "
    "average, 'params' the raw training parameters.")
_OUT = flags.DEFINE_string(
    'out', None, 'Output folder for the result files and metrics.json.')
flags.mark_flags_as_required(['config', 'workdir', 'out'])


def main(argv: list) -> None:
  """Validates the config, restores the checkpoint, evaluates and writes DIR.

  Args:
    argv: leftover command-line arguments (none are accepted).

  Raises:
    app.UsageError: for positional arguments.
  """
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  config = _CONFIG.value
  spec = cli.start(config)
  workdir = os.path.abspath(_WORKDIR.value)
  out_dir = os.path.abspath(_OUT.value)
  try:
    module, variables, step, mesh = trainer.restore_variables(
        config, workdir, _STEP.value, _WEIGHTS.value)
  except (FileNotFoundError, ValueError) as error:
    sys.exit(f'eval.evaluate: cannot restore a checkpoint from {workdir}: '
             f'{error}')
  logging.info('evaluating %s/%s/%d into %s', workdir,
               trainer.CHECKPOINT_DIR, step, out_dir)
  metrics = dict(spec.evaluate(module, variables, config, workdir, out_dir,
                               mesh))
  if jax.process_index() == 0:
    writers.write_json(os.path.join(out_dir, 'metrics.json'), metrics)
    print(json.dumps({'step': step, 'metrics': metrics}, sort_keys=True),
          flush=True)


if __name__ == '__main__':
  app.run(main)
