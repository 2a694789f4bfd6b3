"""Multi-scale deformable attention (Deformable DETR) in pure JAX.

The sampling core computes, for every query, head, level and point, a bilinear
sample of that head's value map (grid_sample semantics: align_corners=False,
zero padding) and sums the samples weighted by the attention weights.

Implementation (gather-based, no dense one-hot matrices):

* Every level's value map is zero-padded by one pixel and turned into a table
  of 2x2 blocks: row (i, j) holds the four neighbours (i, j), (i, j+1),
  (i+1, j), (i+1, j+1) of the padded map side by side, 4*Dh channels. All
  levels are concatenated into one table [B, R, Hh, 4*Dh].
* A sample at (x, y) then needs ONE row gather (at its top-left neighbour)
  and four corner weights, into which the attention weight is folded. Corners
  that fall outside the map read the zero padding; samples entirely outside
  get zero weight.
* The gather + weighted sum has a custom VJP (recompute the gather rather than
  store the [.., 4*Dh] samples; value gradient by scatter-add) and runs over
  chunks of queries with `lax.scan` on CPU, so the gathered slab stays small;
  on accelerators it runs in one pass.
"""

import functools
import math
from typing import Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SpatialShapes = Tuple[Tuple[int, int], ...]

# Bytes of gathered samples one scan step may hold on CPU (about cache-sized).
_CPU_CHUNK_BYTES = 32 * 2**20


def _check_shapes(value, spatial_shapes, sampling_locations, attention_weights):
  """Raises ValueError unless the core's inputs have consistent shapes."""
  if value.ndim != 4:
    raise ValueError(f'ms_deform_attn_core: value shape {value.shape} is not [B, S, Hh, Dh]')
  b, s, hh, _ = value.shape
  total = sum(h * w for h, w in spatial_shapes)
  if total != s:
    raise ValueError(f'ms_deform_attn_core: value has {s} positions but spatial_shapes '
                     f'{spatial_shapes} give {total}')
  n_levels = len(spatial_shapes)
  if (sampling_locations.ndim != 6 or sampling_locations.shape[0] != b
      or sampling_locations.shape[2:4] != (hh, n_levels) or sampling_locations.shape[5] != 2):
    raise ValueError(f'ms_deform_attn_core: sampling_locations shape {sampling_locations.shape} '
                     f'is not [{b}, Nq, {hh}, {n_levels}, P, 2]')
  if attention_weights.shape != sampling_locations.shape[:5]:
    raise ValueError(f'ms_deform_attn_core: attention_weights shape {attention_weights.shape} '
                     f'is not {sampling_locations.shape[:5]}')


def _block_table(value: jnp.ndarray, spatial_shapes: SpatialShapes) -> jnp.ndarray:
  """Builds the 2x2-block table of all levels.

  Args:
    value: [B, S, Hh, Dh] values, levels flattened row-major and concatenated.
    spatial_shapes: static ((H_l, W_l), ...).

  Returns:
    [B, R, Hh, 4*Dh] with R = sum_l (H_l+1)*(W_l+1); row (i, j) of level l holds
    padded pixels (i, j), (i, j+1), (i+1, j), (i+1, j+1) (padded = original + 1).
  """
  b, _, hh, dh = value.shape
  tables = []
  start = 0
  for h, w in spatial_shapes:
    v = value[:, start:start + h * w].reshape(b, h, w, hh, dh)  # [B, H, W, Hh, Dh]
    start += h * w
    v = jnp.pad(v, ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))  # [B, H+2, W+2, Hh, Dh]
    block = jnp.concatenate([v[:, :-1, :-1], v[:, :-1, 1:], v[:, 1:, :-1], v[:, 1:, 1:]],
                            axis=-1)  # [B, H+1, W+1, Hh, 4Dh]
    tables.append(block.reshape(b, (h + 1) * (w + 1), hh, 4 * dh))  # [B, R_l, Hh, 4Dh]
  return jnp.concatenate(tables, axis=1)  # [B, R, Hh, 4Dh]


def _rows_and_weights(spatial_shapes: SpatialShapes, sampling_locations: jnp.ndarray,
                      attention_weights: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Table rows and attention-weighted corner weights of every sample.

  Args:
    spatial_shapes: static ((H_l, W_l), ...).
    sampling_locations: [B, Nq, Hh, L, P, 2] normalised (x, y) in [0, 1].
    attention_weights: [B, Nq, Hh, L, P].

  Returns:
    rows: int32 [B, Nq, L*P, Hh] table rows (top-left neighbour's block).
    weights: float32 [B, Nq, L*P, Hh, 4] corner weights (top-left, top-right,
      bottom-left, bottom-right) times the attention weight; zero for samples
      with no corner inside the map.
  """
  b, nq, hh, n_levels, n_points, _ = sampling_locations.shape
  heights = np.array([h for h, _ in spatial_shapes], np.int32)[:, None]  # [L, 1]
  widths = np.array([w for _, w in spatial_shapes], np.int32)[:, None]  # [L, 1]
  starts = np.cumsum([0] + [(h + 1) * (w + 1) for h, w in spatial_shapes])[:-1]
  starts = starts.astype(np.int32)[:, None]  # [L, 1]
  loc = sampling_locations.astype(jnp.float32)  # [B, Nq, Hh, L, P, 2]
  grid = 2 * loc - 1  # [B, Nq, Hh, L, P, 2] in [-1, 1], as grid_sample takes it
  x = ((grid[..., 0] + 1) * widths - 1) / 2  # [B, Nq, Hh, L, P] pixel coordinate
  y = ((grid[..., 1] + 1) * heights - 1) / 2  # [B, Nq, Hh, L, P] pixel coordinate
  x0 = jnp.floor(x)  # [B, Nq, Hh, L, P]
  y0 = jnp.floor(y)  # [B, Nq, Hh, L, P]
  fx = x - x0  # [B, Nq, Hh, L, P]
  fy = y - y0  # [B, Nq, Hh, L, P]
  # Tested on the floats so that far-away (or non-finite) locations never wrap around int32.
  inside = (x0 >= -1) & (x0 < widths) & (y0 >= -1) & (y0 < heights)  # [B, Nq, Hh, L, P]
  x0 = jnp.clip(x0, -1, widths).astype(jnp.int32)  # [B, Nq, Hh, L, P]
  y0 = jnp.clip(y0, -1, heights).astype(jnp.int32)  # [B, Nq, Hh, L, P]
  corners = jnp.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy],
                      axis=-1)  # [B, Nq, Hh, L, P, 4]
  weights = corners * attention_weights.astype(jnp.float32)[..., None]  # [B, Nq, Hh, L, P, 4]
  weights = jnp.where(inside[..., None], weights, 0.0)  # [B, Nq, Hh, L, P, 4]
  rows = (starts + jnp.minimum(y0 + 1, heights) * (widths + 1)
          + jnp.minimum(x0 + 1, widths))  # [B, Nq, Hh, L, P]
  rows = rows.reshape(b, nq, hh, n_levels * n_points).swapaxes(2, 3)  # [B, Nq, LP, Hh]
  weights = weights.reshape(b, nq, hh, n_levels * n_points, 4).swapaxes(2, 3)  # [B, Nq, LP, Hh, 4]
  return rows, weights


def _gather_rows(table: jnp.ndarray, rows: jnp.ndarray) -> jnp.ndarray:
  """table[b, rows[b, n, k, h], h] for every (b, n, k, h).

  Args:
    table: [B, R, Hh, C].
    rows: int32 [B, n, K, Hh], all in [0, R).

  Returns:
    [B, n, K, Hh, C].
  """
  b, _, hh, _ = table.shape
  bi = jnp.arange(b)[:, None, None, None]  # [B, 1, 1, 1]
  hi = jnp.arange(hh)[None, None, None, :]  # [1, 1, 1, Hh]
  return table.at[bi, rows, hi].get(mode='promise_in_bounds')  # [B, n, K, Hh, C]


def _to_chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
  """[B, n, ...] -> [n/chunk, B, chunk, ...] (n must be a multiple of chunk)."""
  b, n = x.shape[:2]
  return x.reshape(b, n // chunk, chunk, *x.shape[2:]).swapaxes(0, 1)  # [n/c, B, c, ...]


def _from_chunks(x: jnp.ndarray) -> jnp.ndarray:
  """[n/chunk, B, chunk, ...] -> [B, n, ...]."""
  x = x.swapaxes(0, 1)  # [B, n/c, c, ...]
  return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])  # [B, n, ...]


def _weighted_rows_fwd(table, rows, weights, chunk):
  """Forward of `_weighted_rows`; returns the output and the residuals."""
  b, n, k, hh = rows.shape
  dh = table.shape[-1] // 4

  def step(_, xs):
    r, w = xs  # [B, c, K, Hh], [B, c, K, Hh, 4]
    g = _gather_rows(table, r).reshape(b, chunk, k, hh, 4, dh)  # [B, c, K, Hh, 4, Dh]
    out = (g.astype(jnp.float32) * w[..., None]).sum(axis=(2, 4))  # [B, c, Hh, Dh]
    return None, out

  _, out = jax.lax.scan(step, None, (_to_chunks(rows, chunk), _to_chunks(weights, chunk)))
  return _from_chunks(out), (table, rows, weights)  # [B, n, Hh, Dh]


def _weighted_rows_bwd(chunk, residuals, cotangent):
  """Backward of `_weighted_rows`: scatter-add into the table, re-gather for the weights."""
  table, rows, weights = residuals
  b, n, k, hh = rows.shape
  dh = table.shape[-1] // 4
  bi = jnp.arange(b)[:, None, None, None]  # [B, 1, 1, 1]
  hi = jnp.arange(hh)[None, None, None, :]  # [1, 1, 1, Hh]

  def step(d_table, xs):
    r, w, ct = xs  # [B, c, K, Hh], [B, c, K, Hh, 4], [B, c, Hh, Dh]
    ct_k = ct[:, :, None, :, None, :]  # [B, c, 1, Hh, 1, Dh]
    g = _gather_rows(table, r).reshape(b, chunk, k, hh, 4, dh)  # [B, c, K, Hh, 4, Dh]
    d_w = (g.astype(jnp.float32) * ct_k).sum(axis=-1)  # [B, c, K, Hh, 4]
    update = (w[..., None] * ct_k).reshape(b, chunk, k, hh, 4 * dh)  # [B, c, K, Hh, 4Dh]
    d_table = d_table.at[bi, r, hi].add(update, mode='promise_in_bounds')  # [B, R, Hh, 4Dh]
    return d_table, d_w

  d_table, d_weights = jax.lax.scan(
      step, jnp.zeros(table.shape, jnp.float32),
      (_to_chunks(rows, chunk), _to_chunks(weights, chunk),
       _to_chunks(cotangent.astype(jnp.float32), chunk)))
  return d_table.astype(table.dtype), None, _from_chunks(d_weights)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _weighted_rows(table: jnp.ndarray, rows: jnp.ndarray, weights: jnp.ndarray,
                   chunk: int) -> jnp.ndarray:
  """sum_{k, c} weights[b, n, k, h, c] * table[b, rows[b, n, k, h], h, c*Dh:(c+1)*Dh].

  Args:
    table: [B, R, Hh, 4*Dh] block table.
    rows: int32 [B, n, K, Hh] rows; n a multiple of chunk.
    weights: float32 [B, n, K, Hh, 4] corner weights.
    chunk: queries per scan step.

  Returns:
    float32 [B, n, Hh, Dh].
  """
  return _weighted_rows_fwd(table, rows, weights, chunk)[0]


_weighted_rows.defvjp(_weighted_rows_fwd, _weighted_rows_bwd)


def _default_chunk(num_queries: int, row_bytes: int) -> int:
  """Queries per scan step: cache-sized slabs on CPU, a single pass elsewhere."""
  if jax.default_backend() != 'cpu':
    return num_queries
  return max(1, min(num_queries, _CPU_CHUNK_BYTES // row_bytes))


def ms_deform_attn_core(value: jnp.ndarray,
                        spatial_shapes: Sequence[Tuple[int, int]],
                        sampling_locations: jnp.ndarray,
                        attention_weights: jnp.ndarray,
                        query_chunk: Optional[int] = None) -> jnp.ndarray:
  """Multi-scale deformable attention sampling (`ms_deform_attn_core_pytorch`).

  Equivalent to grid_sample(bilinear, padding_mode='zeros', align_corners=False)
  of each head's value map at each sampling location, weighted by the
  attention weights and summed over levels and points. Differentiable (reverse
  mode) in value, sampling_locations and attention_weights.

  Args:
    value: [B, S, Hh, Dh] per-head values, levels flattened row-major and
      concatenated in `spatial_shapes` order (S = sum H_l*W_l).
    spatial_shapes: static sequence of (H_l, W_l) per level.
    sampling_locations: [B, Nq, Hh, L, P, 2] normalised (x, y); (0, 0) is the
      top-left corner and (1, 1) the bottom-right corner of the map.
    attention_weights: [B, Nq, Hh, L, P].
    query_chunk: queries per scan step; None picks about 32 MiB of gathered
      samples per step on CPU and one pass on other backends.

  Returns:
    [B, Nq, Hh*Dh] in value's dtype.
  """
  spatial_shapes = tuple((int(h), int(w)) for h, w in spatial_shapes)
  _check_shapes(value, spatial_shapes, sampling_locations, attention_weights)
  b, _, hh, dh = value.shape
  nq = sampling_locations.shape[1]
  n_samples = sampling_locations.shape[3] * sampling_locations.shape[4]
  chunk = query_chunk or _default_chunk(nq, b * n_samples * hh * 4 * dh * 4)
  table = _block_table(value, spatial_shapes)  # [B, R, Hh, 4Dh]
  rows, weights = _rows_and_weights(spatial_shapes, sampling_locations,
                                    attention_weights)  # [B, Nq, LP, Hh], [B, Nq, LP, Hh, 4]
  padded = -nq % chunk
  if padded:
    rows = jnp.pad(rows, ((0, 0), (0, padded), (0, 0), (0, 0)))  # [B, Nq', LP, Hh]
    weights = jnp.pad(weights, ((0, 0), (0, padded), (0, 0), (0, 0), (0, 0)))  # [B, Nq', LP, Hh, 4]
  out = _weighted_rows(table, rows, weights, chunk)  # [B, Nq', Hh, Dh]
  return out[:, :nq].reshape(b, nq, hh * dh).astype(value.dtype)  # [B, Nq, Hh*Dh]


def _sampling_offsets_bias(n_heads: int, n_levels: int, n_points: int):
  """Deformable DETR's initial sampling offsets: point i of head h at (i+1)*dir_h."""

  def init(key, shape, dtype=jnp.float32):
    del key
    thetas = np.arange(n_heads, dtype=np.float32) * (2.0 * math.pi / n_heads)  # [Hh]
    grid = np.stack([np.cos(thetas), np.sin(thetas)], -1)  # [Hh, 2]
    grid = grid / np.abs(grid).max(-1, keepdims=True)  # [Hh, 2]
    grid = np.tile(grid[:, None, None, :], (1, n_levels, n_points, 1))  # [Hh, L, P, 2]
    grid = grid * np.arange(1, n_points + 1, dtype=np.float32)[None, None, :, None]  # [Hh, L, P, 2]
    return jnp.asarray(grid.reshape(shape), dtype)

  return init


class MSDeformAttn(nn.Module):
  """Multi-scale deformable attention module (Deformable DETR `MSDeformAttn`).

  Parameters are Dense layers `sampling_offsets` (D -> Hh*L*P*2, zero kernel,
  bias = the Deformable DETR direction grid), `attention_weights`
  (D -> Hh*L*P, zeros), `value_proj` and `output_proj` (Xavier-uniform, zero
  bias); torch weights convert by transposing each Linear weight.

  Attributes:
    d_model: model width D.
    n_levels: number of feature levels L.
    n_heads: number of heads Hh (must divide D).
    n_points: sampling points P per head and level.
    query_chunk: see `ms_deform_attn_core`.
    dtype: computation dtype of the projections.
  """
  d_model: int = 256
  n_levels: int = 4
  n_heads: int = 8
  n_points: int = 4
  query_chunk: Optional[int] = None
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self,
               query: jnp.ndarray,
               reference_points: jnp.ndarray,
               input_flatten: jnp.ndarray,
               spatial_shapes: Sequence[Tuple[int, int]],
               input_padding_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
    """Attends from each query to P points per head around its reference point on every level.

    Args:
      query: [B, Nq, D] queries (position embedding already added).
      reference_points: [B, Nq, L, 2] normalised (x, y) points, or
        [B, Nq, L, 4] normalised (cx, cy, w, h) boxes (offsets then scale with
        half the box size divided by P).
      input_flatten: [B, S, D] flattened multi-level features, S = sum H_l*W_l.
      spatial_shapes: static sequence of (H_l, W_l), length n_levels.
      input_padding_mask: optional bool [B, S], True at padded positions
        (their values are zeroed).

    Returns:
      [B, Nq, D].
    """
    b, nq, d = query.shape
    s = input_flatten.shape[1]
    hh, nl, npt = self.n_heads, self.n_levels, self.n_points
    if d != self.d_model or input_flatten.shape != (b, s, d):
      raise ValueError(f'MSDeformAttn: query {query.shape} / input_flatten {input_flatten.shape} '
                       f'do not have width d_model={self.d_model}')
    if d % hh:
      raise ValueError(f'MSDeformAttn: d_model={d} is not divisible by n_heads={hh}')
    if len(spatial_shapes) != nl:
      raise ValueError(f'MSDeformAttn: {len(spatial_shapes)} spatial_shapes for n_levels={nl}')
    if reference_points.shape not in ((b, nq, nl, 2), (b, nq, nl, 4)):
      raise ValueError(f'MSDeformAttn: reference_points shape {reference_points.shape} is not '
                       f'[{b}, {nq}, {nl}, 2 or 4]')
    if input_padding_mask is not None and input_padding_mask.shape != (b, s):
      raise ValueError(f'MSDeformAttn: input_padding_mask shape {input_padding_mask.shape} '
                       f'is not [{b}, {s}]')
    dense = functools.partial(nn.Dense, dtype=self.dtype)
    value = dense(d, kernel_init=nn.initializers.xavier_uniform(),
                  bias_init=nn.initializers.zeros, name='value_proj')(input_flatten)  # [B, S, D]
    if input_padding_mask is not None:
      value = jnp.where(input_padding_mask[..., None], 0.0, value).astype(value.dtype)  # [B, S, D]
    value = value.reshape(b, s, hh, d // hh)  # [B, S, Hh, Dh]
    offsets = dense(hh * nl * npt * 2, kernel_init=nn.initializers.zeros,
                    bias_init=_sampling_offsets_bias(hh, nl, npt),
                    name='sampling_offsets')(query)  # [B, Nq, Hh*L*P*2]
    offsets = offsets.reshape(b, nq, hh, nl, npt, 2).astype(jnp.float32)  # [B, Nq, Hh, L, P, 2]
    logits = dense(hh * nl * npt, kernel_init=nn.initializers.zeros,
                   bias_init=nn.initializers.zeros,
                   name='attention_weights')(query)  # [B, Nq, Hh*L*P]
    attn = jax.nn.softmax(logits.reshape(b, nq, hh, nl * npt).astype(jnp.float32),
                          axis=-1)  # [B, Nq, Hh, L*P]
    attn = attn.reshape(b, nq, hh, nl, npt)  # [B, Nq, Hh, L, P]
    ref = reference_points.astype(jnp.float32)  # [B, Nq, L, 2|4]
    if ref.shape[-1] == 2:
      normalizer = jnp.array([[w, h] for h, w in spatial_shapes], jnp.float32)  # [L, 2]
      locations = (ref[:, :, None, :, None, :]
                   + offsets / normalizer[None, None, None, :, None, :])  # [B, Nq, Hh, L, P, 2]
    else:
      locations = (ref[:, :, None, :, None, :2]
                   + offsets / npt * ref[:, :, None, :, None, 2:] * 0.5)  # [B, Nq, Hh, L, P, 2]
    out = ms_deform_attn_core(value, spatial_shapes, locations, attn,
                              query_chunk=self.query_chunk)  # [B, Nq, D]
    return dense(d, kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.zeros, name='output_proj')(out)  # [B, Nq, D]
