"""The optimiser: AdamW with per-group learning-rate multipliers.

The update of a parameter p in learning-rate group g at update number t
(t = 0 for the first update) is

    u = -lr(t) * m_g * (adam(clip(grads))_p + wd * p * decay_p)

which is AdamW with the group's learning rate lr(t) * m_g (the multiplier
scales the decoupled weight decay too, as torch's per-group lr does):

* clip: the gradients are scaled to a global norm of at most `clip_norm` over
  the whole model (off when `clip_norm` is 0).
* decay_p is 0 for one-dimensional parameters (biases, norm scales and offsets)
  and for parameters the model names as embeddings (`no_weight_decay(path)`),
  1 otherwise.
* lr(t) = lr * min(1, (t + 1) / warmup_steps) * decay_factor ** k, where k is
  the number of `decay_steps` boundaries b with t >= b (linear warm-up, then
  step decay; AIMS: lr 1e-4, boundaries (28000, 33000), factor 0.1).
"""

from typing import Callable, Dict, Mapping, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

Path = Tuple[str, ...]


def path_names(key_path: Sequence[object]) -> Path:
  """Converts a jax tree key path into a tuple of names.

  Args:
    key_path: a key path from `jax.tree_util.tree_flatten_with_path`.

  Returns:
    The names of the path's entries (dict keys, attribute names, indices).
  """
  names = []
  for entry in key_path:
    if isinstance(entry, jax.tree_util.DictKey):
      names.append(str(entry.key))
    elif isinstance(entry, jax.tree_util.GetAttrKey):
      names.append(entry.name)
    elif isinstance(entry, jax.tree_util.SequenceKey):
      names.append(str(entry.idx))
    elif isinstance(entry, jax.tree_util.FlattenedIndexKey):
      names.append(str(entry.key))
    else:
      raise TypeError(f'unsupported tree key {entry!r} in path {key_path}')
  return tuple(names)


def lr_schedule(base_lr: float, warmup_steps: int, decay_steps: Sequence[int],
                decay_factor: float) -> optax.Schedule:
  """Linear warm-up followed by step decay.

  Args:
    base_lr: the peak learning rate.
    warmup_steps: number of warm-up updates (0 for none); update t uses
      base_lr * min(1, (t + 1) / warmup_steps).
    decay_steps: increasing update numbers at which the rate is multiplied by
      `decay_factor`.
    decay_factor: the step-decay factor (e.g. 0.1).

  Returns:
    A schedule mapping the update count t (0 for the first update) to the
    learning rate.

  Raises:
    ValueError: for a negative warm-up or unsorted / negative decay steps.
  """
  if warmup_steps < 0:
    raise ValueError(f'optim.warmup_steps must be >= 0, got {warmup_steps}')
  boundaries = tuple(int(b) for b in decay_steps)
  if any(b < 0 for b in boundaries) or list(boundaries) != sorted(boundaries):
    raise ValueError('optim.decay_steps must be non-negative and increasing, '
                     f'got {tuple(decay_steps)}')

  def schedule(count: jax.Array) -> jax.Array:
    count = jnp.asarray(count)  # []
    lr = jnp.asarray(base_lr, jnp.float32)  # []
    if warmup_steps > 0:
      lr = lr * jnp.minimum(1.0, (count + 1) / warmup_steps)  # []
    for boundary in boundaries:
      lr = jnp.where(count >= boundary, lr * decay_factor, lr)  # []
    return lr

  return schedule


def group_names(params: object, param_group: Callable[[Path], str]) -> object:
  """Maps every parameter to its learning-rate group name.

  Args:
    params: a parameter tree (arrays or shape structs).
    param_group: parameter path -> group name.

  Returns:
    A tree with the structure of `params` holding group names.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: param_group(path_names(path)), params)


def check_multipliers(params: object, multipliers: Mapping[str, float],
                      param_group: Callable[[Path], str]) -> Dict[str, int]:
  """Checks that every multiplier names a group that has parameters.

  Args:
    params: a parameter tree (arrays or shape structs).
    multipliers: `config.optim.lr_multipliers`, group -> multiplier.
    param_group: parameter path -> group name.

  Returns:
    The number of scalar parameters in each group.

  Raises:
    ValueError: naming a multiplier group without parameters, or a negative
      multiplier.
  """
  counts: Dict[str, int] = {}
  groups = jax.tree.leaves(group_names(params, param_group))
  for group, leaf in zip(groups, jax.tree.leaves(params)):
    counts[group] = counts.get(group, 0) + int(leaf.size)
  for group, value in multipliers.items():
    if group not in counts:
      raise ValueError(
          f'config.optim.lr_multipliers names group {group!r}, but the '
          f'model\'s parameter groups are {sorted(counts)}')
    if value < 0:
      raise ValueError(f'config.optim.lr_multipliers.{group} must be >= 0, '
                       f'got {value}')
  return counts


def decay_mask(params: object, no_weight_decay: Callable[[Path], bool]) -> object:
  """Which parameters receive weight decay.

  Args:
    params: a parameter tree.
    no_weight_decay: parameter path -> True to exempt a parameter.

  Returns:
    A tree of bools: True for parameters of two or more dimensions that are
    not exempt.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not no_weight_decay(path_names(path)),
      params)


def scale_by_group(multipliers: Mapping[str, float],
                   param_group: Callable[[Path], str]
                   ) -> optax.GradientTransformation:
  """Multiplies each update by its parameter group's multiplier.

  Args:
    multipliers: group name -> multiplier; groups not named use 1.
    param_group: parameter path -> group name.

  Returns:
    An optax transformation.
  """
  multipliers = dict(multipliers.items())

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    del params
    scaled = jax.tree_util.tree_map_with_path(
        lambda path, u: u * multipliers.get(param_group(path_names(path)), 1.0),
        updates)
    return scaled, state

  return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_config: ml_collections.ConfigDict,
                   param_group: Callable[[Path], str],
                   no_weight_decay: Callable[[Path], bool]
                   ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """Builds AdamW with clipping, group multipliers and the lr schedule.

  Args:
    optim_config: `config.optim` with `lr`, `warmup_steps`, `decay_steps`,
      `decay_factor`, `weight_decay`, `clip_norm`, `b1`, `b2`, `eps` and
      `lr_multipliers` (group -> multiplier).
    param_group: parameter path -> learning-rate group name.
    no_weight_decay: parameter path -> True to exempt it from weight decay.

  Returns:
    (optimizer, schedule): the optax transformation and the base learning-rate
    schedule it uses (as a function of the update count).
  """
  schedule = lr_schedule(optim_config.lr, optim_config.warmup_steps,
                         optim_config.decay_steps, optim_config.decay_factor)
  parts = []
  if optim_config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_config.clip_norm))
  parts += [
      optax.scale_by_adam(b1=optim_config.b1, b2=optim_config.b2,
                          eps=optim_config.eps),
      optax.add_decayed_weights(
          optim_config.weight_decay,
          mask=lambda params: decay_mask(params, no_weight_decay)),
      scale_by_group(optim_config.lr_multipliers, param_group),
      optax.scale_by_learning_rate(schedule),
  ]
  return optax.chain(*parts), schedule
