"""Exact one-to-one (Hungarian) matchers with one static-shape contract.

Contract shared by every one-to-one matcher in this package::

  pred_idx, matched = matcher(cost, gt_valid)

* `cost`: `[..., N, M]` float cost of prediction n for ground-truth slot m
  (leading dims are batch dims; gradients are stopped inside).
* `gt_valid`: `[..., M]` bool, False for padded ground-truth slots.
* `pred_idx`: `[..., M]` int32, the prediction matched to ground-truth slot m
  (0 where `matched` is False).
* `matched`: `[..., M]` bool, True where slot m is valid and received a
  prediction. With N >= number of valid slots every valid slot is matched;
  otherwise the min(N, valid) matched slots form an optimal assignment.

Padded slots never take part: the assignment minimises the summed cost over the
valid columns only, exactly as `scipy.optimize.linear_sum_assignment` on
`cost[:, gt_valid]`. Both matchers work inside `jax.jit` and `jax.vmap`.

Non-finite costs: `hungarian_host` raises (the error names the flattened batch
element); `hungarian_device` cannot raise under jit, so it treats NaN and +inf as
worse than every finite cost of that matrix and -inf as better than every finite
cost, which yields a valid assignment.
"""

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy.optimize import linear_sum_assignment


def _check_inputs(name: str, cost: jax.Array, gt_valid: jax.Array) -> None:
  if cost.ndim < 2 or gt_valid.shape != cost.shape[:-2] + cost.shape[-1:]:
    raise ValueError(
        f"{name}: expected cost [..., N, M] and gt_valid [..., M]; got cost "
        f"{cost.shape} and gt_valid {gt_valid.shape}")


def _solve_on_host(cost: np.ndarray, gt_valid: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Runs scipy's exact solver per batch element on the valid columns only."""
  cost = np.asarray(cost)
  gt_valid = np.asarray(gt_valid).astype(bool)
  num_pred, num_gt = cost.shape[-2:]
  flat_cost = cost.reshape(-1, num_pred, num_gt)  # [B', N, M]
  flat_valid = gt_valid.reshape(-1, num_gt)  # [B', M]
  pred_idx = np.zeros(flat_valid.shape, np.int32)  # [B', M]
  matched = np.zeros(flat_valid.shape, bool)  # [B', M]
  for b in range(flat_cost.shape[0]):
    cols = np.flatnonzero(flat_valid[b])  # [Mv]
    if cols.size == 0 or num_pred == 0:
      continue
    sub = flat_cost[b][:, cols]  # [N, Mv]
    if not np.all(np.isfinite(sub)):
      bad = sorted(set(cols[np.nonzero(~np.isfinite(sub))[1]].tolist()))
      raise ValueError(
          f"hiseg_jax.matching.hungarian_host: cost matrix of (flattened) batch element "
          f"{b} has NaN/inf entries in valid ground-truth columns {bad}; the "
          f"predictions or targets feeding the cost are not finite")
    rows, sel = linear_sum_assignment(sub)
    pred_idx[b, cols[sel]] = rows
    matched[b, cols[sel]] = True
  return pred_idx.reshape(gt_valid.shape), matched.reshape(gt_valid.shape)


def hungarian_host(cost: jax.Array, gt_valid: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Exact Hungarian matching with scipy on the host, via `jax.pure_callback`.

  Padded ground truth is sliced off per batch element before the solve. Under
  `jax.vmap` the callback receives all batch dims at once
  (`vmap_method="broadcast_all"`) and loops over them on the host.

  Args:
    cost: `[..., N, M]` cost matrices.
    gt_valid: `[..., M]` bool validity of the ground-truth slots.

  Returns:
    `(pred_idx int32 [..., M], matched bool [..., M])`, see the module contract.

  Raises:
    ValueError: on shape mismatch (at trace time) or, when the callback runs,
      on NaN/inf costs in a valid column (surfaced by JAX as a runtime error
      carrying this message).
  """
  _check_inputs("hungarian_host", cost, gt_valid)
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)  # [..., N, M]
  gt_valid = gt_valid.astype(jnp.bool_)  # [..., M]
  out_shapes = (jax.ShapeDtypeStruct(gt_valid.shape, jnp.int32),
                jax.ShapeDtypeStruct(gt_valid.shape, jnp.bool_))
  return jax.pure_callback(_solve_on_host, out_shapes, cost, gt_valid,
                           vmap_method="broadcast_all")


def _solve_on_device(cost: jax.Array, gt_valid: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Solves one `[N, M]` problem with optax's exact Hungarian algorithm."""
  num_pred, num_gt = cost.shape
  finite = jnp.isfinite(cost)  # [N, M]
  usable = finite & gt_valid[None, :]  # [N, M]
  any_usable = usable.any()  # []
  hi = jnp.where(any_usable, jnp.max(jnp.where(usable, cost, -jnp.inf)), 0.0)  # []
  lo = jnp.where(any_usable, jnp.min(jnp.where(usable, cost, jnp.inf)), 0.0)  # []
  span = jnp.maximum(hi - lo, jnp.finfo(jnp.float32).tiny)  # []
  # Valid finite costs are mapped affinely into [0, 1] (this keeps the optimum of
  # every fixed-size assignment), NaN/+inf to 2 and -inf to -1.
  non_finite = jnp.where(cost == -jnp.inf, -1.0, 2.0)  # [N, M]
  normalised = jnp.where(finite, (cost - lo) / span, non_finite)  # [N, M]
  # Padded columns get a constant: any constant is exact when every column is
  # assigned (N >= M). With N < M, trading one valid pick for a padded one must
  # always cost more: entries lie in [-1, 2], so a set of k valid picks differs
  # from one of k + 1 by less than 3N, and the constant 3N + 3 makes the solver
  # take as many valid columns as possible, optimally.
  pad_cost = 0.0 if num_pred >= num_gt else 3.0 * num_pred + 3.0
  normalised = jnp.where(gt_valid[None, :], normalised, pad_cost)  # [N, M]
  rows, cols = optax.assignment.hungarian_algorithm(normalised)  # [min(N, M)], [min(N, M)]
  pred_idx = jnp.zeros((num_gt,), jnp.int32).at[cols].set(rows.astype(jnp.int32))  # [M]
  matched = jnp.zeros((num_gt,), jnp.bool_).at[cols].set(True) & gt_valid  # [M]
  return jnp.where(matched, pred_idx, 0), matched


def hungarian_device(cost: jax.Array, gt_valid: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Exact Hungarian matching on device (`optax.assignment.hungarian_algorithm`).

  Padded slots cannot be sliced off with static shapes, so they get a constant
  cost that leaves the optimum over the valid columns unchanged (see
  `_solve_on_device`). Agrees with `hungarian_host` up to ties (equal total cost).

  Args:
    cost: `[..., N, M]` cost matrices.
    gt_valid: `[..., M]` bool validity of the ground-truth slots.

  Returns:
    `(pred_idx int32 [..., M], matched bool [..., M])`, see the module contract.

  Raises:
    ValueError: on shape mismatch.
  """
  _check_inputs("hungarian_device", cost, gt_valid)
  cost = jax.lax.stop_gradient(cost).astype(jnp.float32)  # [..., N, M]
  lead = gt_valid.shape[:-1]
  num_pred, num_gt = cost.shape[-2:]
  flat_cost = cost.reshape((-1, num_pred, num_gt))  # [B', N, M]
  flat_valid = gt_valid.astype(jnp.bool_).reshape((-1, num_gt))  # [B', M]
  pred_idx, matched = jax.vmap(_solve_on_device)(flat_cost, flat_valid)  # [B', M], [B', M]
  return pred_idx.reshape(lead + (num_gt,)), matched.reshape(lead + (num_gt,))


def matched_queries(pred_idx: jax.Array, matched: jax.Array, num_queries: int) -> jax.Array:
  """Marks the predictions that a matcher assigned to some ground truth.

  Args:
    pred_idx: `[B, M]` int32 matched prediction per ground-truth slot.
    matched: `[B, M]` bool, whether the slot is matched.
    num_queries: N, number of predictions.

  Returns:
    `[B, N]` bool, True for predictions matched to a valid ground truth.
  """
  hits = jax.nn.one_hot(pred_idx, num_queries, dtype=jnp.int32) * matched[..., None]  # [B, M, N]
  return hits.sum(axis=-2) > 0  # [B, N]
