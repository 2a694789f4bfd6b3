"""Registers AIMS with the trainer (`config.model.name = 'aims'`, configs/aims.py).

What the one trainer needs from AIMS (hiseg_jax/registry.py): the module built from
`config.model`, the set criterion of `hiseg_jax.losses.aims_loss` on the mixture batches of
`data_pipelines.pipeline`, the training iterator over the datasets of AIMS Table 6, and the
evaluation of `eval.aims_eval`.
"""

from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import aims_mixture
from data_pipelines import dataset_config
from data_pipelines import pipeline
from hiseg_jax import config_validation
from hiseg_jax import registry
from hiseg_jax.aims.model import AIMSModel
from hiseg_jax.aims.model import build_aims_model
from hiseg_jax.backbones.image_normalization import normalize_image
from hiseg_jax.losses.aims_loss import aims_set_criterion


def build(config: ml_collections.ConfigDict) -> AIMSModel:
  """Builds the AIMS module from `config.model` (strict keys, see `build_aims_model`).

  Args:
    config: the run config.

  Returns:
    The AIMSModel with its backbone and pixel decoder.
  """
  return build_aims_model(config.model)


def init_inputs(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Example inputs for `module.init`.

  Args:
    config: the run config.

  Returns:
    {'image': float32 [1, S, S, 3], 'prompt_mask': float32 [1, S, S], 'train': False}.
  """
  s = config.image_size
  return {'image': np.zeros((1, s, s, 3), np.float32),
          'prompt_mask': np.ones((1, s, s), np.float32), 'train': False}


def apply_model(module: AIMSModel, variables: Any, batch: Mapping[str, jax.Array],
                train: bool, rng: jax.Array = None) -> Dict[str, Any]:
  """Runs the model on a data-contract batch (image and prompt mask).

  Args:
    module: the AIMSModel.
    variables: {'params': ..., other collections}.
    batch: with 'image' uint8 [B, S, S, 3] and 'prompt/mask' [B, S, S].
    train: training mode.
    rng: dropout key (training only).

  Returns:
    The model's output dict.
  """
  rngs = {'dropout': rng} if rng is not None else {}
  return module.apply(variables, normalize_image(batch['image']),
                      batch['prompt/mask'].astype(jnp.float32), train=train, rngs=rngs)


def static_sample_tasks(config: ml_collections.ConfigDict, batch_size: int,
                        train: bool) -> Optional[Tuple[int, ...]]:
  """The sample type at every position of a global training batch, when the layout fixes it.

  The training pipeline puts type `sample_types[g % K]` at global position g; with a global
  batch divisible by K every batch has that same layout.

  Args:
    config: the run config (`input.sample_types`).
    batch_size: the global batch size.
    train: training mode (evaluation batches carry no mixture).

  Returns:
    The types of positions 0..batch_size-1, or None when the layout varies between batches.
  """
  types = tuple(config.input.sample_types)
  if not train or batch_size % len(types):
    return None
  return tuple(types[g % len(types)] for g in range(batch_size))


def loss_fn(module: AIMSModel, variables: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
            config: ml_collections.ConfigDict, train: bool
            ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """AIMS loss (Eq. 9) of a mixture batch.

  Args:
    module: the AIMSModel.
    variables: {'params': ..., other collections}.
    batch: the global batch (data contract).
    rng: the step's key.
    config: the run config (`config.loss`).
    train: training mode.

  Returns:
    (loss, per-term scalars (with `L/off_layout` when the batch layout is static, see
    `aims_set_criterion`), plus the number of truncated instances per level).
  """
  dropout_rng, loss_rng = jax.random.split(rng)
  outputs = apply_model(module, variables, batch, train, dropout_rng)
  layout = static_sample_tasks(config, batch['task'].shape[0], train)
  loss, terms = aims_set_criterion(outputs, batch, loss_rng, config.loss.to_dict(),
                                   sample_tasks=layout)
  truncated = jnp.sum(batch['stats/truncated'], axis=0)  # [3]
  for i, level in enumerate(('part', 'entity', 'relation')):
    terms[f'{level}/truncated'] = truncated[i].astype(jnp.float32)
  return loss, terms


def input_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config section `data_pipelines.pipeline` reads, from `config.input` and trainer keys.

  Args:
    config: the run config.

  Returns:
    A ConfigDict with `config.input` plus image_size, batch_size, seed and class_agnostic.
  """
  section = config_validation.pipeline_section(config)
  section.class_agnostic = True
  return section


def make_train_iterator(config: ml_collections.ConfigDict, workdir: str):
  """The endless AIMS mixture iterator of this process's batches.

  Args:
    config: the run config.
    workdir: the run's directory (the synthetic default is generated there).

  Returns:
    A checkpointable grain iterator.
  """
  names = [n for n in aims_mixture.TABLE_DATASETS if n in config.datasets]
  sources = dataset_config.build_sources(config.datasets, names,
                                         dataset_config.default_root(config, workdir))
  return iter(pipeline.build_train_pipeline(input_section(config), sources).dataset)


def evaluate(module, variables, config, workdir, out_dir, mesh) -> Dict[str, float]:
  """AIMS evaluation into `out_dir` (see `eval.aims_eval.evaluate`)."""
  from eval import aims_eval  # pylint: disable=g-import-not-at-top
  return aims_eval.evaluate(module, variables, config, workdir, out_dir, mesh)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.eval` at the start of a run (see `eval.aims_eval.check_eval_config`).

  Args:
    config: the run config.

  Raises:
    ValueError: naming what is wrong in `config.eval`.
  """
  from eval import aims_eval  # pylint: disable=g-import-not-at-top
  aims_eval.check_eval_config(config)


registry.register('aims', registry.ModelSpec(
    build=build,
    init_inputs=init_inputs,
    loss_fn=loss_fn,
    make_train_iterator=make_train_iterator,
    evaluate=evaluate,
    config_sections=('model', 'loss', 'input', 'datasets', 'eval', 'synthetic', 'data_root',
                     'image_size'),
    check_config=check_config,
))
