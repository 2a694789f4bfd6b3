"""Registers HIPIE with the trainer (`config.model.name = 'hipie'`, configs/hipie.py).

What the one trainer needs from HIPIE (hiseg_jax/registry.py): the module built from
`config.model` (`build_hipie_model`), the thing + stuff criterion of
`hiseg_jax.losses.hipie_loss` on the task-mixture batches of `data_pipelines.hipie_pipeline`,
the training iterator over `config.input.mixture`, and the evaluation of `eval.hipie_eval`.

A training batch mixes tasks (panoptic, referring and part samples in task groups, as the
reference mixes them across GPUs), so the model runs once on the whole batch with per-sample
referring mode (`HIPIEModel(grounding=...)`): a referring sample is scored against its pooled
sentence at token 0. Both criteria see every segment of a sample (things then stuff, the
reference gives both decoders all panoptic segments and denoises all of them); the stuff
criterion skips referring samples (`active`), which the reference trains on detection batches
only.

Text: `config.text.vocab` is a BERT vocab.txt; '' takes the synthetic dataset's whole-word
vocabulary (`<root>/text/vocab.txt`, written by the generator), for the randomly initialised
text encoder of `runlocal`. `config.text.weights` is a Hugging Face BERT directory (config.json +
model.safetensors, e.g. bert-base-uncased for `r50`) whose weights initialise the text encoder;
'' keeps the random initialisation.
"""

import os
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import dataset_config
from data_pipelines import hipie_pipeline
from data_pipelines import hipie_samples
from data_pipelines.synthetic import writers as synthetic_writers
from hiseg_jax import config_validation
from hiseg_jax import registry
from hiseg_jax.backbones.image_normalization import normalize_image
from hiseg_jax.hipie.model import HIPIEModel
from hiseg_jax.hipie.model import build_hipie_model
from hiseg_jax.losses.hipie_loss import hipie_criterion
from hiseg_jax.text import load_bert
from hiseg_jax.text import load_bert_tokenizer

REFERRING = hipie_samples.TASK_IDS['referring']


def build(config: ml_collections.ConfigDict) -> HIPIEModel:
  """Builds the HIPIE module from `config.model` (strict keys, see `build_hipie_model`).

  Args:
    config: the run config.

  Returns:
    The HIPIEModel.
  """
  return build_hipie_model(config.model)


def init_inputs(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """Example inputs for `module.init` (detection mode creates every parameter).

  Args:
    config: the run config.

  Returns:
    {'image': float32 [1, S, S, 3], 'text_ids': int32 [1, T], 'text_mask': int32 [1, T],
    'train': False}.
  """
  s, t = config.image_size, config.input.max_text_len
  return {'image': np.zeros((1, s, s, 3), np.float32), 'text_ids': np.zeros((1, t), np.int32),
          'text_mask': np.ones((1, t), np.int32), 'train': False}


def all_segments(batch: Mapping[str, jax.Array]) -> Dict[str, jax.Array]:
  """Things then stuff of a batch as one set of segments.

  Args:
    batch: with `things/*` (N slots) and `stuff/*` (Ns slots) of `hipie_samples`.

  Returns:
    'boxes' [B, N + Ns, 4], 'masks' float32 [B, N + Ns, S/4, S/4], 'valid' bool [B, N + Ns],
    'positive_map' bool [B, N + Ns, T], 'is_thing' bool [B, N + Ns].
  """
  cat = lambda key: jnp.concatenate([batch[f'things/{key}'], batch[f'stuff/{key}']], axis=1)
  things = batch['things/valid']  # [B, N]
  return {
      'boxes': cat('boxes').astype(jnp.float32),  # [B, N', 4]
      'masks': cat('masks').astype(jnp.float32),  # [B, N', S/4, S/4]
      'valid': cat('valid').astype(bool),  # [B, N']
      'positive_map': cat('positive_map').astype(bool),  # [B, N', T]
      'is_thing': jnp.concatenate([jnp.ones_like(things, bool),
                                   jnp.zeros_like(batch['stuff/valid'], bool)], axis=1),
  }


def apply_model(module: HIPIEModel, variables: Any, batch: Mapping[str, jax.Array],
                train: bool, rng: jax.Array = None, task: str = None) -> Dict[str, Any]:
  """Runs the model on a data-contract batch.

  Args:
    module: the HIPIEModel.
    variables: {'params': ..., other collections}.
    batch: the `hipie_pipeline` batch ('image', 'text/ids', 'text/mask', 'task'; in training
      also the targets, whose boxes feed the denoising queries).
    train: training mode (dropout, denoising).
    rng: dropout / box-noise key (training only).
    task: None: per-sample mode from `batch['task']` (token axis T); 'detection' or
      'grounding': the whole batch in that mode (evaluation passes of one task).

  Returns:
    The model's output dict {'things': ..., 'stuff': ...}.
  """
  rngs = {'dropout': rng} if rng is not None else {}
  kwargs = {}
  if task is None:
    kwargs['grounding'] = batch['task'] == REFERRING  # [B]
  else:
    kwargs['task'] = task
  if train:
    segments = all_segments(batch)
    kwargs['dn_targets'] = {'boxes': segments['boxes'], 'valid': segments['valid']}
  return module.apply(variables, normalize_image(batch['image']), batch['text/ids'],
                      batch['text/mask'], train=train, rngs=rngs, **kwargs)


def criterion_targets(batch: Mapping[str, jax.Array], text_mask: jax.Array
                      ) -> Dict[str, Dict[str, jax.Array]]:
  """The `hipie_criterion` ground truth of a mixed batch.

  A referring sample's one target is positive at token 0, where the model puts its pooled
  sentence logit; `text_mask` is the thing decoder's output mask (one-hot there).

  Args:
    batch: the `hipie_pipeline` batch.
    text_mask: bool [B, T], the model's `things['text_mask']`.

  Returns:
    {'thing': targets, 'stuff': targets}; the stuff targets are inactive on referring samples.
  """
  segments = all_segments(batch)
  referring = batch['task'] == REFERRING  # [B]
  first = jnp.arange(text_mask.shape[1]) == 0  # [T]
  sentence = segments['valid'][..., None] & first  # [B, N', T]
  segments['positive_map'] = jnp.where(referring[:, None, None], sentence,
                                       segments['positive_map'])  # [B, N', T]
  segments['text_mask'] = text_mask
  return {'thing': segments, 'stuff': dict(segments, active=~referring)}


def loss_fn(module: HIPIEModel, variables: Any, batch: Mapping[str, jax.Array], rng: jax.Array,
            config: ml_collections.ConfigDict, train: bool
            ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """HIPIE loss (thing + stuff criteria) of a task-mixture batch.

  Args:
    module: the HIPIEModel.
    variables: {'params': ..., other collections}.
    batch: the global batch (data contract).
    rng: the step's key.
    config: the run config (`config.loss`).
    train: training mode.

  Returns:
    (loss, per-term scalars plus the truncated target counts 'things/truncated' and
    'stuff/truncated').
  """
  model_rng, loss_rng = jax.random.split(rng)
  outputs = apply_model(module, variables, batch, train, model_rng)
  targets = criterion_targets(batch, outputs['things']['text_mask'])
  loss, terms = hipie_criterion({'thing': outputs['things'], 'stuff': outputs['stuff']},
                                targets, loss_rng, config.loss.to_dict())
  truncated = jnp.sum(batch['stats/truncated'], axis=0)  # [2]
  terms['things/truncated'] = truncated[0].astype(jnp.float32)
  terms['stuff/truncated'] = truncated[1].astype(jnp.float32)
  return loss, terms


def tokenizer(config: ml_collections.ConfigDict, root: str):
  """The BERT tokenizer of `config.text.vocab` ('' = the synthetic dataset's vocabulary).

  Args:
    config: the run config.
    root: the default dataset root.

  Returns:
    The fast tokenizer.

  Raises:
    FileNotFoundError: when the vocabulary file does not exist.
    ValueError: when it has more tokens than the text encoder's embedding rows.
  """
  path = config.text.vocab or os.path.join(root, synthetic_writers.VOCAB_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f'config.text.vocab: no vocabulary at {path} (set it to a BERT vocab.txt, e.g. '
        "bert-base-uncased's, when config.data_root is not a synthetic dataset)")
  tok = load_bert_tokenizer(path)
  rows = config.model.text_encoder.vocab_size
  if len(tok) > rows:
    raise ValueError(f'config.text.vocab {path} has {len(tok)} tokens but the text encoder has '
                     f'config.model.text_encoder.vocab_size={rows} embedding rows')
  return tok


def vocabularies(config: ml_collections.ConfigDict, names) -> Dict[str, hipie_samples.Vocabulary]:
  """The class vocabularies of the named datasets that have one (`config.vocabularies`).

  Args:
    config: the run config; `config.vocabularies.<dataset>` is 'synthetic' or a categories JSON.
    names: dataset names with their tasks: {name: task}.

  Returns:
    {name: Vocabulary} for the panoptic and part datasets.

  Raises:
    KeyError: naming a panoptic or part dataset without a `config.vocabularies` entry.
  """
  out = {}
  for name, task in names.items():
    if task == 'referring':
      continue
    if name not in config.vocabularies:
      raise KeyError(f'config.vocabularies has no entry for dataset {name!r} ({task} task); '
                     f'have {sorted(config.vocabularies)}')
    out[name] = hipie_samples.resolve_vocabulary(config.vocabularies[name], task,
                                                 config.datasets[name].format)
  return out


def pretrained(config: ml_collections.ConfigDict) -> Dict[str, Any]:
  """The text encoder's weights from `config.text.weights` ('' = random initialisation).

  Args:
    config: the run config.

  Returns:
    {'text_encoder': params} converted from the Hugging Face BERT directory, or {}.

  Raises:
    ValueError: when the checkpoint's architecture differs from `config.model.text_encoder`
      (only the dropout rates may differ), naming the fields.
  """
  if not config.text.weights:
    return {}
  module, params = load_bert(config.text.weights)
  ours = config.model.text_encoder
  differ = [f'{k}: checkpoint {getattr(module.config, k)!r} vs config {ours[k]!r}'
            for k in ours.keys() if not k.endswith('dropout_prob')
            and getattr(module.config, k) != ours[k]]
  if differ:
    raise ValueError(f'config.text.weights {config.text.weights}: the checkpoint does not match '
                     'config.model.text_encoder (' + '; '.join(differ) + ')')
  return {'text_encoder': params}


def make_train_iterator(config: ml_collections.ConfigDict, workdir: str):
  """The endless HIPIE task-mixture iterator of this process's batches.

  Args:
    config: the run config.
    workdir: the run's directory (the synthetic default is generated there).

  Returns:
    A checkpointable grain iterator.
  """
  root = dataset_config.default_root(config, workdir)
  mixture = hipie_pipeline.read_mixture(config.input)
  sources = dataset_config.build_sources(config.datasets, sorted(mixture), root)
  vocabs = vocabularies(config, {name: task for name, (task, _) in mixture.items()})
  built = hipie_pipeline.build_train_pipeline(config_validation.pipeline_section(config), sources, vocabs,
                                              tokenizer(config, root))
  return iter(built.dataset)


def evaluate(module, variables, config, workdir, out_dir, mesh) -> Dict[str, float]:
  """HIPIE evaluation into `out_dir` (see `eval.hipie_eval.evaluate_hipie`).

  Args:
    module: the HIPIEModel.
    variables: its variables.
    config: the run config (`config.eval` names the datasets of each pass).
    workdir: the run directory.
    out_dir: the output folder.
    mesh: the device mesh.

  Returns:
    The flat metrics in percent.
  """
  from eval import hipie_eval  # pylint: disable=g-import-not-at-top
  root = dataset_config.default_root(config, workdir)
  passes = {config.eval[task]: task for task in hipie_samples.TASKS if config.eval[task]}
  sources = dataset_config.build_sources(config.datasets, sorted(passes), root)
  vocabs = vocabularies(config, passes)

  @jax.jit
  def detection(variables, batch):
    return apply_model(module, variables, batch, train=False, task='detection')

  @jax.jit
  def grounding(variables, batch):
    return apply_model(module, variables, batch, train=False, task='grounding')

  def forward(batch, task):
    return (grounding if task == 'referring' else detection)(variables, batch)

  return hipie_eval.evaluate_hipie(forward, sources, vocabs, tokenizer(config, root),
                                   config_validation.pipeline_section(config), config.eval, out_dir, mesh)


def check_config(config: ml_collections.ConfigDict) -> None:
  """Checks `config.eval` at the start of a run (`eval.hipie_eval.read_eval_config`).

  Args:
    config: the run config.

  Raises:
    ValueError: naming what is wrong in `config.eval`.
  """
  from eval import hipie_eval  # pylint: disable=g-import-not-at-top
  hipie_eval.read_eval_config(config.eval)


registry.register('hipie', registry.ModelSpec(
    build=build,
    init_inputs=init_inputs,
    loss_fn=loss_fn,
    make_train_iterator=make_train_iterator,
    evaluate=evaluate,
    pretrained=pretrained,
    config_sections=('model', 'loss', 'input', 'datasets', 'vocabularies', 'text', 'eval',
                     'synthetic', 'data_root', 'image_size'),
    check_config=check_config,
))
