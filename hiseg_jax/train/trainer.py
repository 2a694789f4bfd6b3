"""The one trainer: `train_and_evaluate(config, workdir)` for every model.

The model comes from the registry (`config.model.name`, see
hiseg_jax/registry.py). The loop, per step: read this process's share of the
batch from the model's grain iterator, build global arrays sharded over the
mesh, run the jitted step (explicit in/out shardings, the state donated), and
then, when due, log metrics, evaluate, and save a checkpoint (train state and
iterator state). The step's randomness is `fold_in(base_rng, step)`, so a run
resumed from a checkpoint reproduces the uninterrupted run step for step.

Order at a step s: log (s % log_every == 0 or last step); on a preemption
notice, save and stop; evaluate (s % eval_every == 0 or last step); save
(s % checkpoint_every == 0 or last step). Evaluating before saving means a run
killed during an evaluation repeats it on resume. Re-running a finished run
does nothing. A SIGTERM (preemption) saves a checkpoint at the current step
and returns normally, so the process exits 0.

With `config.optim.ema_decay` d > 0 the state also keeps an exponential
moving average of the parameters, updated after every step s (counting from 0)
as ema <- r * ema + (1 - r) * params with r = min(d, (1 + s) / (10 + s)) (the
(1 + s) / (10 + s) ramp keeps the random initialisation from dominating early
averages), and every evaluation uses the average instead of the raw parameters.

`restore_variables(config, workdir, step)` loads a run's trained variables for
evaluation outside training.
"""

from concurrent import futures
import copy
import os
import time
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple

import flax
from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from absl import logging
from jax.sharding import Mesh

from hiseg_jax import config_validation
from hiseg_jax import registry
from hiseg_jax.train import checkpoint
from hiseg_jax.train import metrics_writer
from hiseg_jax.train import optim
from hiseg_jax.train import preemption
from hiseg_jax.train import sharding

CHECKPOINT_DIR = 'checkpoints'


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes.

  Attributes:
    step: int32 [], the number of completed steps.
    params: the `params` collection.
    opt_state: the optimiser state.
    model_state: the module's other collections (e.g. frozen batch-norm
      statistics), carried unchanged.
    rng: uint32 key data of the base PRNG key; step s uses
      fold_in(base_key, s).
    ema_params: the moving average of `params` (see the module docstring);
      None when `config.optim.ema_decay` is 0.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  model_state: Any
  rng: jax.Array
  ema_params: Any = None


def eval_params(state: TrainState) -> Any:
  """The parameters evaluation uses: the moving average when kept, else `params`."""
  return state.params if state.ema_params is None else state.ema_params


def _split_inputs(inputs: Mapping[str, Any]
                  ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
  """Splits init inputs into host arrays (traced) and static Python values."""
  arrays = {k: np.asarray(v) for k, v in inputs.items()
            if isinstance(v, (np.ndarray, jax.Array))}
  static = {k: v for k, v in inputs.items() if k not in arrays}
  return arrays, static


def create_train_state(module: nn.Module, spec: registry.ModelSpec,
                       config: ml_collections.ConfigDict,
                       tx: optax.GradientTransformation, mesh: Mesh,
                       materialize: bool = True) -> Tuple[Any, Any]:
  """Initialises the train state directly in its shardings.

  The state's shapes come from `jax.eval_shape`, its shardings from
  `sharding.state_shardings`, and the arrays from `jit(init, out_shardings=...)`,
  so no device ever holds an unsharded copy.

  Args:
    module: the model.
    spec: the model's registry entry (for `init_inputs` and the groups).
    config: the run's config.
    tx: the optimiser.
    mesh: the device mesh.
    materialize: when False only the abstract state is built (for restoring).

  Returns:
    (state, abstract_state): the TrainState (None when not materialised) and
    its `jax.ShapeDtypeStruct` tree carrying the shardings.
  """
  arrays, static = _split_inputs(spec.init_inputs(config))
  pretrained = dict(spec.pretrained(config)) if materialize else {}

  def init(rng: jax.Array, arrays: Dict[str, jax.Array],
           pretrained: Dict[str, Any]) -> TrainState:
    key = jax.random.wrap_key_data(rng)
    params_key, dropout_key, train_key = jax.random.split(key, 3)
    variables = module.init({'params': params_key, 'dropout': dropout_key},
                            **arrays, **static)
    params = with_pretrained(variables['params'], pretrained)
    model_state = {k: v for k, v in variables.items() if k != 'params'}
    ema_params = (jax.tree.map(jnp.copy, params) if config.optim.ema_decay
                  else None)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params), model_state=model_state,
                      rng=jax.random.key_data(train_key),
                      ema_params=ema_params)

  # Host values, so that every process passes the same replicated inputs.
  rng = np.asarray(jax.random.key_data(jax.random.key(config.seed)))  # [2]
  abstract = jax.eval_shape(init, rng, arrays, {})
  with_pretrained(abstract.params, pretrained)  # names and shapes, before any compile
  counts = optim.check_multipliers(abstract.params, config.optim.lr_multipliers,
                                   spec.param_group)
  logging.info('parameters per learning-rate group: %s (multipliers %s)',
               counts, dict(config.optim.lr_multipliers.items()))
  shardings = sharding.state_shardings(abstract, mesh, config.fsdp_min_size)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  if not materialize:
    return None, abstract
  replicated = sharding.replicated(mesh)
  state = jax.jit(init, in_shardings=(replicated, replicated, replicated),
                  out_shardings=shardings)(rng, arrays, pretrained)
  if pretrained:
    logging.info('initialised %s from pretrained weights', sorted(pretrained))
  return state, abstract


def with_pretrained(params: Any, pretrained: Mapping[str, Any]) -> Any:
  """Replaces top-level parameter subtrees by pretrained weights, strictly.

  Args:
    params: the initialised parameters (arrays or `jax.ShapeDtypeStruct`s).
    pretrained: {top-level name: subtree} (`ModelSpec.pretrained`).

  Returns:
    `params` with those subtrees replaced (cast to the initialised dtypes).

  Raises:
    ValueError: listing unknown top-level names, and the missing, unexpected and
      mis-shaped parameter names of each subtree.
  """
  unknown = sorted(set(pretrained) - set(params))
  if unknown:
    raise ValueError(f'pretrained weights for unknown parameter groups {unknown}; the model '
                     f'has {sorted(params)}')
  out = dict(params)
  for name, tree in pretrained.items():
    want = traverse_util.flatten_dict(params[name], sep='/')
    got = traverse_util.flatten_dict(tree, sep='/')
    problems = [f'missing {k}' for k in sorted(set(want) - set(got))]
    problems += [f'unexpected {k}' for k in sorted(set(got) - set(want))]
    problems += [f'{k}: shape {tuple(np.shape(got[k]))} != {tuple(want[k].shape)}'
                 for k in sorted(set(want) & set(got))
                 if tuple(np.shape(got[k])) != tuple(want[k].shape)]
    if problems:
      raise ValueError(f'pretrained {name!r} does not fit the model: ' + '; '.join(problems))
    out[name] = traverse_util.unflatten_dict(
        {k: jnp.asarray(v, want[k].dtype) for k, v in got.items()}, sep='/')
  return out


def make_loss_and_grads(module: nn.Module, spec: registry.ModelSpec,
                        config: ml_collections.ConfigDict
                        ) -> Callable[[TrainState, Dict[str, jax.Array]],
                                      Tuple[jax.Array, Dict[str, jax.Array],
                                            Any]]:
  """The loss of one training step and its gradients.

  Args:
    module: the model.
    spec: the model's registry entry.
    config: the run's config.

  Returns:
    A function (state, batch) -> (loss, per-term metrics, grads) using the
    step's rng fold_in(base_key, state.step).
  """

  def loss_and_grads(state: TrainState, batch: Dict[str, jax.Array]):
    key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_of(params):
      variables = {'params': params, **state.model_state}
      return spec.loss_fn(module, variables, batch, key, config, True)

    (loss, terms), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params)
    return loss, dict(terms), grads

  return loss_and_grads


def make_train_step(module: nn.Module, spec: registry.ModelSpec,
                    config: ml_collections.ConfigDict,
                    tx: optax.GradientTransformation,
                    schedule: optax.Schedule
                    ) -> Callable[[TrainState, Dict[str, jax.Array]],
                                  Tuple[TrainState, Dict[str, jax.Array]]]:
  """One optimisation step (not yet jitted).

  Args:
    module: the model.
    spec: the model's registry entry.
    config: the run's config.
    tx: the optimiser.
    schedule: the base learning-rate schedule (for logging).

  Returns:
    A function (state, batch) -> (new state, metrics) where metrics holds the
    loss's terms, `loss`, `grad_norm` (before clipping) and `lr` (the base
    rate this update used). With `config.optim.ema_decay` > 0 it also updates
    the state's parameter average (see the module docstring).
  """
  loss_and_grads = make_loss_and_grads(module, spec, config)
  ema_decay = config.optim.ema_decay

  def train_step(state: TrainState, batch: Dict[str, jax.Array]):
    loss, metrics, grads = loss_and_grads(state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics.update(loss=loss, grad_norm=optax.tree.norm(grads),
                   lr=schedule(state.step))
    ema_params = state.ema_params
    if ema_decay:
      count = state.step.astype(jnp.float32)
      rate = jnp.minimum(ema_decay, (1.0 + count) / (10.0 + count))
      ema_params = jax.tree.map(
          lambda e, p: (rate * e + (1.0 - rate) * p).astype(e.dtype),
          ema_params, params)
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, ema_params=ema_params)
    return new_state, metrics

  return train_step


def jit_train_step(train_step: Callable, abstract_state: Any, mesh: Mesh
                   ) -> Callable:
  """Jits a train step with explicit shardings and the state donated.

  Args:
    train_step: from `make_train_step`.
    abstract_state: the state's shape structs carrying their shardings.
    mesh: the device mesh.

  Returns:
    The jitted step.
  """
  state_shardings = jax.tree.map(lambda a: a.sharding, abstract_state)
  return jax.jit(
      train_step,
      in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
      out_shardings=(state_shardings, sharding.replicated(mesh)),
      donate_argnums=(0,))


class Training(NamedTuple):
  """What the trainer builds from a config before the first step (`build_training`).

  Attributes:
    spec: the model's registry entry.
    mesh: the device mesh of `config.mesh`.
    module: the model.
    state: the initial TrainState, or None when not materialised.
    abstract_state: the state's `jax.ShapeDtypeStruct` tree with its shardings.
    train_step: the jitted step `(state, batch) -> (state, metrics)`, state donated.
  """
  spec: registry.ModelSpec
  mesh: Mesh
  module: nn.Module
  state: Optional[TrainState]
  abstract_state: Any
  train_step: Callable


def build_training(config: ml_collections.ConfigDict,
                   materialize: bool = True,
                   mesh: Optional[Mesh] = None) -> Training:
  """Builds the mesh, model, optimiser, train state and jitted step of a config.

  The one place that assembles a training step: the training loop, restoring
  for evaluation, the step benchmark and tests all use it.

  Args:
    config: the run's config (`config.model.name` picks the model).
    materialize: when False only the abstract state is built (for restoring).
    mesh: the mesh of `config.mesh` when the caller has already built it;
      built here when None.

  Returns:
    The `Training` parts.
  """
  spec = registry.get(config_validation.model_name(config))
  mesh = sharding.make_mesh(config.mesh) if mesh is None else mesh
  module = spec.build(config)
  tx, schedule = optim.make_optimizer(config.optim, spec.param_group,
                                      spec.no_weight_decay)
  state, abstract_state = create_train_state(module, spec, config, tx, mesh,
                                             materialize=materialize)
  train_step = jit_train_step(
      make_train_step(module, spec, config, tx, schedule), abstract_state, mesh)
  return Training(spec, mesh, module, state, abstract_state, train_step)


def _local_batch_size(config: ml_collections.ConfigDict, mesh: Mesh) -> int:
  """This process's share of the global batch, checking divisibility."""
  if config.batch_size % mesh.size:
    raise ValueError(f'config.batch_size={config.batch_size} is not divisible '
                     f'by the {mesh.size} devices of the mesh')
  return config.batch_size // jax.process_count()


def _evaluate(spec: registry.ModelSpec, module: nn.Module, state: TrainState,
              config: ml_collections.ConfigDict, workdir: str, step: int,
              mesh: Mesh, writer: metrics_writer.MetricsWriter
              ) -> Dict[str, float]:
  """Runs the model's evaluation (of `eval_params`) and records its metrics."""
  variables = {'params': eval_params(state), **state.model_state}
  start = time.time()
  out_dir = os.path.join(workdir, 'eval', str(step))
  metrics = dict(spec.evaluate(module, variables, config, workdir, out_dir,
                               mesh))
  logging.info('evaluation at step %d (%.1f s): %s', step,
               time.time() - start, metrics)
  writer.write_eval(step, metrics)
  return metrics


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> Dict[str, float]:
  """Trains the configured model, evaluating periodically and at the end.

  Re-running with the same workdir resumes from the latest checkpoint in
  `workdir/checkpoints`. A SIGTERM makes the loop save a checkpoint at the
  current step and return.

  Args:
    config: the run's config (trainer keys, see hiseg_jax/config_validation.py,
      plus the model's sections).
    workdir: the run's directory (checkpoints, metrics.jsonl, tensorboard/,
      eval/).

  Returns:
    The metrics of the last evaluation run by this call ({} if none ran, e.g.
    when the run was already complete or was preempted before evaluating).

  Raises:
    ValueError: before anything is built or written, for a bad config: the
      trainer's keys (`config_validation.validate`), what the model's
      `check_config` checks (e.g. its evaluation section), and a batch size
      that the mesh's devices do not divide.
  """
  spec = registry.get(config_validation.model_name(config))
  config_validation.validate(config, spec.config_sections)
  spec.check_config(config)
  mesh = sharding.make_mesh(config.mesh)
  local_batch_size = _local_batch_size(config, mesh)
  config = copy.deepcopy(config)
  config.lock()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)

  checkpointer = checkpoint.Checkpointer(
      os.path.join(workdir, CHECKPOINT_DIR), config.keep_checkpoints,
      config.async_checkpoints)
  start_step = checkpointer.latest_step()
  # On one process the data iterator (which may first generate the synthetic
  # dataset) is built in a thread while the train state compiles: XLA compiles
  # without holding the GIL. Several processes build it afterwards, since the
  # generation synchronises them.
  with futures.ThreadPoolExecutor(max_workers=1) as pool:
    pending = (pool.submit(spec.make_train_iterator, config, workdir)
               if jax.process_count() == 1 else None)
    training = build_training(config, materialize=start_step is None,
                              mesh=mesh)
    data_iterator = (pending.result() if pending is not None else
                     spec.make_train_iterator(config, workdir))
  module, state, train_step = training.module, training.state, training.train_step
  logging.info('process %d of %d; %d devices (%s); mesh %s',
               jax.process_index(), jax.process_count(), jax.device_count(),
               jax.devices()[0].platform, dict(mesh.shape))
  if start_step is None:
    start_step = 0
  else:
    logging.info('resuming from %s/%d', checkpointer.directory, start_step)
    state, data_iterator = checkpointer.restore(
        start_step, training.abstract_state, data_iterator)
  batch_sharding = sharding.batch_sharding(mesh)
  is_main = jax.process_index() == 0
  writer = metrics_writer.MetricsWriter(workdir, start_step, enabled=is_main)
  last_eval: Dict[str, float] = {}
  total = config.total_steps
  step = start_step
  mark_step, mark_time = None, None
  with preemption.PreemptionWatcher() as watcher, tqdm.tqdm(
      total=total, initial=start_step, desc='train', disable=not is_main,
      dynamic_ncols=True) as progress:
    while step < total:
      batch = sharding.global_batch(next(data_iterator), batch_sharding,
                                    local_batch_size)
      state, metrics = train_step(state, batch)
      step += 1
      progress.update(1)
      if mark_step is None:
        jax.block_until_ready(metrics)
        mark_step, mark_time = step, time.time()
      if step % config.log_every == 0 or step == total:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        if step > mark_step:
          values['steps_per_sec'] = (step - mark_step) / (now - mark_time)
          values['images_per_sec'] = values['steps_per_sec'] * config.batch_size
        mark_step, mark_time = step, now
        writer.write_train(step, values)
        progress.set_postfix(loss=f'{values["loss"]:.4g}')
      if watcher.should_stop(step):
        logging.warning('preemption notice: saving step %d and stopping', step)
        checkpointer.save(step, state, data_iterator)
        break
      if step == total or (config.eval_every and
                           step % config.eval_every == 0):
        last_eval = _evaluate(spec, module, state, config, workdir, step, mesh,
                              writer)
        mark_step, mark_time = step, time.time()
      if step % config.checkpoint_every == 0 or step == total:
        checkpointer.save(step, state, data_iterator)
    checkpointer.close()
  writer.close()
  return last_eval


WEIGHTS = ('ema', 'params')


def restore_variables(config: ml_collections.ConfigDict, workdir: str,
                      step: Optional[int] = None, weights: str = ''
                      ) -> Tuple[nn.Module, Dict[str, Any], int, Mesh]:
  """Loads a run's trained variables for evaluation.

  Args:
    config: the run's config.
    workdir: the run's directory (with `checkpoints/`).
    step: the checkpoint to load; the latest when None.
    weights: which parameters: '' those the trainer evaluates (`eval_params`:
      the moving average when `config.optim.ema_decay` > 0), 'ema' the
      moving average, 'params' the raw training parameters.

  Returns:
    (module, variables, step, mesh): the model, `{'params': ...,
    **model_state}` sharded as in training, the step loaded, and the mesh.

  Raises:
    FileNotFoundError: if `workdir` has no checkpoints.
    ValueError: for an invalid config, a missing step, a checkpoint that
      does not match the model, an unknown `weights`, or 'ema' for a run
      without a moving average.
  """
  spec = registry.get(config_validation.model_name(config))
  config_validation.validate(config, spec.config_sections)
  if weights and weights not in WEIGHTS:
    raise ValueError(f'weights must be one of {WEIGHTS} or empty, got {weights!r}')
  if weights == 'ema' and not config.optim.ema_decay:
    raise ValueError("weights='ema' needs a run trained with config.optim.ema_decay > 0")
  directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no checkpoints in {directory}')
  training = build_training(config, materialize=False)
  checkpointer = checkpoint.Checkpointer(directory, config.keep_checkpoints,
                                         async_save=False)
  if step is None:
    step = checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f'no complete checkpoint in {directory}')
  state = checkpointer.restore_state(step, training.abstract_state)
  checkpointer.close()
  params = state.params if weights == 'params' else eval_params(state)
  return (training.module, {'params': params, **state.model_state}, step,
          training.mesh)
