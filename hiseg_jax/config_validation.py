"""The trainer's config keys: defaults and validation at start.

A run's config has the trainer's keys below plus the sections its model owns
(`ModelSpec.config_sections`, which include `model` with `model.name`).
`validate` rejects unknown top-level keys, unknown or missing keys inside the
trainer's sections, wrong types and out-of-range values, listing every problem
at once.

Trainer keys:
  seed: int, base of the parameter init, dropout and data-order randomness.
  total_steps: int > 0, number of training steps.
  batch_size: int > 0, global batch size (split over processes and devices).
  log_every: int > 0, steps between metrics.jsonl records.
  eval_every: int >= 0, steps between evaluations (0: only the final one).
  checkpoint_every: int > 0, steps between checkpoints.
  keep_checkpoints: int > 0, how many checkpoints to keep.
  async_checkpoints: bool, write checkpoints in the background.
  multihost: bool, call `jax.distributed.initialize()` at start.
  fsdp_min_size: int > 0, state arrays smaller than this are not split over
    the mesh's 'fsdp' axis.
  mesh: {'data': int, 'fsdp': int}, mesh axis sizes (one may be -1).
  optim: lr, warmup_steps, decay_steps, decay_factor, weight_decay, clip_norm,
    b1, b2, eps, lr_multipliers (group -> multiplier); see train/optim.py;
    ema_decay (0 <= d < 1; > 0 keeps an exponential moving average of the
    parameters, which evaluation then uses; see train/trainer.py).
"""

import numbers
from typing import Iterable, List

import ml_collections

_INT = 'int'
_FLOAT = 'float'
_BOOL = 'bool'

_TRAINER_KEYS = {
    'seed': _INT,
    'total_steps': _INT,
    'batch_size': _INT,
    'log_every': _INT,
    'eval_every': _INT,
    'checkpoint_every': _INT,
    'keep_checkpoints': _INT,
    'async_checkpoints': _BOOL,
    'multihost': _BOOL,
    'fsdp_min_size': _INT,
    'mesh': None,
    'optim': None,
}

_OPTIM_KEYS = {
    'lr': _FLOAT,
    'warmup_steps': _INT,
    'decay_steps': None,
    'decay_factor': _FLOAT,
    'weight_decay': _FLOAT,
    'clip_norm': _FLOAT,
    'b1': _FLOAT,
    'b2': _FLOAT,
    'eps': _FLOAT,
    'lr_multipliers': None,
    'ema_decay': _FLOAT,
}

_POSITIVE = ('total_steps', 'batch_size', 'log_every', 'checkpoint_every',
             'keep_checkpoints', 'fsdp_min_size')


def base_config() -> ml_collections.ConfigDict:
  """The trainer's keys with AIMS's defaults (configs add the model sections).

  Returns:
    A ConfigDict with every trainer key.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 36000
  config.batch_size = 8
  config.log_every = 20
  config.eval_every = 5000
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.async_checkpoints = True
  config.multihost = False
  config.fsdp_min_size = 2 ** 20
  config.mesh = ml_collections.ConfigDict({'data': -1, 'fsdp': 1})
  config.optim = ml_collections.ConfigDict({
      'lr': 1e-4,
      'warmup_steps': 10,
      'decay_steps': (28000, 33000),
      'decay_factor': 0.1,
      'weight_decay': 0.05,
      'clip_norm': 0.01,
      'b1': 0.9,
      'b2': 0.999,
      'eps': 1e-8,
      'lr_multipliers': ml_collections.ConfigDict({'backbone': 0.1}),
      'ema_decay': 0.0,
  })
  return config


def model_name(config: ml_collections.ConfigDict) -> str:
  """Returns `config.model.name`, the registry name of the model to train.

  Args:
    config: the run's config.

  Returns:
    The model name.

  Raises:
    ValueError: if `config.model.name` is missing or not a string.
  """
  if 'model' not in config or 'name' not in config.model:
    raise ValueError('invalid config: config.model.name is missing (the '
                     'registered model to train)')
  if not isinstance(config.model.name, str):
    raise ValueError('invalid config: config.model.name must be a string, got '
                     f'{config.model.name!r}')
  return config.model.name


def _type_problem(name: str, value: object, kind: str) -> List[str]:
  """Checks one scalar's type."""
  if kind == _BOOL and not isinstance(value, bool):
    return [f'config.{name} must be a bool, got {value!r}']
  if kind == _INT and (isinstance(value, bool)
                       or not isinstance(value, numbers.Integral)):
    return [f'config.{name} must be an int, got {value!r}']
  if kind == _FLOAT and (isinstance(value, bool)
                         or not isinstance(value, numbers.Real)):
    return [f'config.{name} must be a number, got {value!r}']
  return []


def key_problems(section: str, keys: Iterable[str], expected: Iterable[str],
                 allowed_extra: Iterable[str] = ()) -> List[str]:
  """Lists unknown and missing keys of one section.

  Args:
    section: the section's dotted name, e.g. 'config.eval'.
    keys: the keys it has.
    expected: the keys it must have.
    allowed_extra: keys it may have.

  Returns:
    One message per unknown key ('<section>.<key>: unknown key (known: ...)') and per missing
    key ('<section>.<key>: missing').
  """
  keys, expected = set(keys), set(expected)
  problems = []
  known = expected | set(allowed_extra)
  for key in sorted(keys - known):
    problems.append(f'{section}.{key}: unknown key (known: '
                    f'{", ".join(sorted(known))})')
  for key in sorted(expected - keys):
    problems.append(f'{section}.{key}: missing')
  return problems


def validate(config: ml_collections.ConfigDict,
             model_sections: Iterable[str]) -> None:
  """Checks a run's config before anything is built.

  Args:
    config: the run's config.
    model_sections: the top-level keys the selected model owns (`model` is
      always allowed).

  Raises:
    ValueError: listing every unknown / missing key, wrong type and
      out-of-range value.
  """
  problems = key_problems('config', config.keys(), _TRAINER_KEYS,
                           set(model_sections) | {'model'})
  for name, kind in _TRAINER_KEYS.items():
    if kind is not None and name in config:
      problems += _type_problem(name, config[name], kind)
  for name in _POSITIVE:
    if name in config and isinstance(config[name], int) and config[name] <= 0:
      problems.append(f'config.{name} must be > 0, got {config[name]}')
  if isinstance(config.get('eval_every'), int) and config.eval_every < 0:
    problems.append(f'config.eval_every must be >= 0, got {config.eval_every}')
  if 'mesh' in config:
    problems += key_problems('config.mesh', config.mesh.keys(),
                              ('data', 'fsdp'))
    for axis in ('data', 'fsdp'):
      if axis in config.mesh:
        problems += _type_problem(f'mesh.{axis}', config.mesh[axis], _INT)
  if 'optim' in config:
    optim = config.optim
    problems += key_problems('config.optim', optim.keys(), _OPTIM_KEYS)
    for name, kind in _OPTIM_KEYS.items():
      if kind is not None and name in optim:
        problems += _type_problem(f'optim.{name}', optim[name], kind)
    if 'decay_steps' in optim:
      steps = optim.decay_steps
      if (not isinstance(steps, (tuple, list))
          or not all(isinstance(s, int) and not isinstance(s, bool)
                     for s in steps)):
        problems.append('config.optim.decay_steps must be a tuple of ints, got '
                        f'{steps!r}')
    ema_decay = optim.get('ema_decay')
    if (isinstance(ema_decay, numbers.Real) and not isinstance(ema_decay, bool)
        and not 0.0 <= ema_decay < 1.0):
      problems.append('config.optim.ema_decay must be in [0, 1), got '
                      f'{ema_decay!r}')
    if 'lr_multipliers' in optim:
      multipliers = optim.lr_multipliers
      if not isinstance(multipliers, ml_collections.ConfigDict):
        problems.append('config.optim.lr_multipliers must be a ConfigDict of '
                        f'group -> multiplier, got {multipliers!r}')
      else:
        for group, value in multipliers.items():
          problems += _type_problem(f'optim.lr_multipliers.{group}', value,
                                    _FLOAT)
  if problems:
    raise ValueError('invalid config:\n  ' + '\n  '.join(problems))


def pipeline_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The section a model's grain pipeline reads: a copy of `config.input` plus trainer keys.

  Args:
    config: the run config (with an `input` section and `image_size`).

  Returns:
    A ConfigDict with `config.input` plus image_size, batch_size and seed.
  """
  section = ml_collections.ConfigDict(config.input.to_dict())
  section.image_size = config.image_size
  section.batch_size = config.batch_size
  section.seed = config.seed
  return section
