"""The model registry: what the one trainer needs from a model, by name.

A model (AIMS, HIPIE, a test model) registers a `ModelSpec` under a name;
`config.model.name` selects it. The trainer only ever talks to a model through
this contract:

* `build(config) -> nn.Module`: the Flax linen module.
* `init_inputs(config) -> dict`: keyword arguments for `module.init`. Array
  values (numpy or jax) are example inputs (batch size 1 is enough) and are
  traced; any other value (e.g. `train=False`) is passed as a static Python
  value. Parameters are created by `module.init(rngs, **init_inputs(config))`
  with rngs `params` and `dropout`; every collection other than `params`
  (e.g. frozen batch-norm statistics) is carried unchanged in the train state
  as `model_state` and checkpointed with it.
* `loss_fn(module, variables, batch, rng, config, train) -> (loss, metrics)`:
  `variables` is `{'params': ..., **model_state}`, `batch` the global batch (a
  dict of sharded arrays, see DESIGN.md "Data contract"), `rng` a typed PRNG
  key already folded with the step, `loss` a scalar and `metrics` a flat dict
  of scalar per-term losses logged next to it. It runs under `jax.jit` and may
  use `jax.pure_callback` (e.g. host Hungarian matching).
* `make_train_iterator(config, workdir) -> grain.DatasetIterator`: an endless
  iterator of this process's share of each global batch (leading dimension
  `config.batch_size // jax.process_count()`), a dict of numpy arrays. It must
  be a grain `DatasetIterator` (or `DataLoaderIterator`) so that its state is
  checkpointed by grain's orbax handler. It may prepare data in `workdir`
  (e.g. generate the synthetic dataset).
* `evaluate(module, variables, config, workdir, out_dir, mesh) -> dict`: runs
  the model's evaluation, writes its files (result files and `metrics.json`)
  under `out_dir`, and returns a flat dict of float metrics. `workdir` is the
  run's directory, where the model may find data it prepared (e.g. the
  synthetic dataset); the trainer passes `workdir/eval/<step>` as `out_dir`,
  `python -m eval.evaluate` the folder its caller names.
* `param_group(path) -> str`: the learning-rate group of the parameter at
  `path` (a tuple of names); `config.optim.lr_multipliers` maps group names to
  multipliers (groups not named there use 1). Default: the top-level module
  name, so `{'backbone': 0.1}` scales everything under `params['backbone']`.
* `no_weight_decay(path) -> bool`: whether a parameter of two or more
  dimensions is excluded from weight decay (one-dimensional parameters, i.e.
  biases and norm scales, never decay). Default: `default_no_weight_decay`.
* `pretrained(config) -> dict`: weights that replace the random initialisation,
  `{top-level parameter name: parameter subtree}` (e.g. `{'text_encoder':
  bert_params}` from a converted Hugging Face checkpoint); each subtree must
  hold exactly the names and shapes of the initialised one. Default: none.
* `config_sections`: the top-level config keys the model owns (the trainer
  owns the others, see `hiseg_jax.config_validation`); any other top-level key
  is rejected at start.
* `check_config(config) -> None`: raises ValueError for bad values of sections
  that are read only late in a run (e.g. `config.eval`, read at the first
  evaluation); the trainer calls it at start, so a typo fails before training
  instead of after it. Default: no check.

Built-in models live in modules imported on first lookup (`_BUILTIN_MODULES`);
importing such a module registers its spec.
"""

import dataclasses
import importlib
import re
from typing import Any, Callable, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import ml_collections

Path = Tuple[str, ...]

_EMBEDDING_NAME = re.compile(r'(embed|embedding|position_bias_table)$')

# Model name -> module that registers it when imported.
_BUILTIN_MODULES: Dict[str, str] = {
    'aims': 'hiseg_jax.aims.spec',
    'hipie': 'hiseg_jax.hipie.spec',
}

_REGISTRY: Dict[str, 'ModelSpec'] = {}


def default_param_group(path: Path) -> str:
  """Returns the top-level module name of a parameter as its group.

  Args:
    path: the parameter's names from the root of `params`, e.g.
      ('backbone', 'stem', 'kernel').

  Returns:
    path[0].
  """
  return path[0]


def no_pretrained(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The default `pretrained`: every parameter starts from its initialiser.

  Args:
    config: the run config (unused).

  Returns:
    {}.
  """
  del config
  return {}


def no_config_check(config: ml_collections.ConfigDict) -> None:
  """The default `check_config`: the model checks its sections where it reads them.

  Args:
    config: the run config (unused).
  """
  del config


def default_no_weight_decay(path: Path) -> bool:
  """Whether a parameter is an embedding table exempt from weight decay.

  Args:
    path: the parameter's names from the root of `params`.

  Returns:
    True when the parameter's own name ends in `embedding` (flax nn.Embed),
    `embed` (e.g. `pos_embed`) or `position_bias_table` (Swin).
  """
  return _EMBEDDING_NAME.search(path[-1]) is not None


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """What the trainer needs from a model (see the module docstring).

  Attributes:
    build: config -> flax module.
    init_inputs: config -> keyword arguments for `module.init`.
    loss_fn: (module, variables, batch, rng, config, train) -> (loss, metrics).
    make_train_iterator: (config, workdir) -> grain iterator of local batches.
    evaluate: (module, variables, config, workdir, out_dir, mesh) -> metrics.
    config_sections: top-level config keys owned by the model.
    param_group: parameter path -> learning-rate group name.
    no_weight_decay: parameter path -> True to exempt it from weight decay.
    pretrained: config -> {top-level parameter name: weights} replacing the initialisation.
    check_config: config -> None, raising ValueError for values read late in a run.
  """
  build: Callable[[ml_collections.ConfigDict], nn.Module]
  init_inputs: Callable[[ml_collections.ConfigDict], Mapping[str, Any]]
  loss_fn: Callable[..., Tuple[jax.Array, Mapping[str, jax.Array]]]
  make_train_iterator: Callable[[ml_collections.ConfigDict, str], Any]
  evaluate: Callable[..., Mapping[str, float]]
  config_sections: Tuple[str, ...] = ('model',)
  param_group: Callable[[Path], str] = default_param_group
  no_weight_decay: Callable[[Path], bool] = default_no_weight_decay
  pretrained: Callable[[ml_collections.ConfigDict], Mapping[str, Any]] = no_pretrained
  check_config: Callable[[ml_collections.ConfigDict], None] = no_config_check


def register(name: str, spec: ModelSpec) -> None:
  """Registers a model under `name`.

  Args:
    name: the value of `config.model.name` that selects the model.
    spec: the model's `ModelSpec`.

  Raises:
    ValueError: if `name` is already registered.
    TypeError: if `spec` is not a ModelSpec.
  """
  if not isinstance(spec, ModelSpec):
    raise TypeError(f'register({name!r}): expected a ModelSpec, got '
                    f'{type(spec).__name__}')
  if name in _REGISTRY:
    raise ValueError(f'model {name!r} is already registered')
  _REGISTRY[name] = spec


def names() -> Tuple[str, ...]:
  """Returns the names that can be looked up (registered and built in).

  Returns:
    Sorted model names.
  """
  return tuple(sorted(set(_REGISTRY) | set(_BUILTIN_MODULES)))


def get(name: str) -> ModelSpec:
  """Returns the spec registered under `name`, importing a built-in if needed.

  Args:
    name: a model name, e.g. `config.model.name`.

  Returns:
    The ModelSpec.

  Raises:
    KeyError: if no model of that name exists, listing the known names.
  """
  if name not in _REGISTRY and name in _BUILTIN_MODULES:
    importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _REGISTRY:
      raise KeyError(f'importing {_BUILTIN_MODULES[name]} did not register '
                     f'model {name!r}')
  if name not in _REGISTRY:
    raise KeyError(f'unknown model {name!r} (config.model.name); registered '
                   f'models: {", ".join(names())}')
  return _REGISTRY[name]
