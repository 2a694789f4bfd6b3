"""Tests for hiseg_jax.layers.deformable_attention against PyTorch's reference formulation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hiseg_jax.layers.deformable_attention import MSDeformAttn, ms_deform_attn_core
from torch_references import TorchMSDeformAttn, torch_ms_deform_attn_core

SHAPES = ((6, 7), (3, 4), (2, 2))
# float32 bilinear sampling with a different summation order than grid_sample:
# outputs and value/weight gradients agree to 1e-5 absolute; location gradients
# (scaled by the map sizes) to 1e-4 absolute.
ATOL = 1e-5
ATOL_LOC_GRAD = 1e-4


def _random_inputs(seed, b=2, nq=10, hh=2, dh=4, n_points=3, shapes=SHAPES):
  rng = np.random.default_rng(seed)
  s = sum(h * w for h, w in shapes)
  value = rng.normal(size=(b, s, hh, dh)).astype(np.float32)
  # Some locations fall outside [0, 1] to exercise the zero padding.
  locations = rng.uniform(-0.3, 1.3, size=(b, nq, hh, len(shapes), n_points, 2)).astype(np.float32)
  weights = rng.uniform(size=(b, nq, hh, len(shapes), n_points)).astype(np.float32)
  return value, locations, weights


@pytest.mark.parametrize('query_chunk', [None, 3, 10])
def test_core_forward_and_gradients_match_grid_sample(query_chunk):
  value, locations, weights = _random_inputs(0)
  cot = np.random.default_rng(1).normal(size=(2, 10, 8)).astype(np.float32)
  tv, tl, tw = [torch.from_numpy(x).requires_grad_() for x in (value, locations, weights)]
  ref = torch_ms_deform_attn_core(tv, SHAPES, tl, tw)
  (ref * torch.from_numpy(cot)).sum().backward()

  def f(v, l, w):
    return ms_deform_attn_core(v, SHAPES, l, w, query_chunk=query_chunk)  # [B, Nq, Hh*Dh]

  out = jax.jit(f)(value, locations, weights)
  assert out.shape == (2, 10, 8)
  np.testing.assert_allclose(np.asarray(out), ref.detach().numpy(), atol=ATOL)
  grads = jax.jit(jax.grad(lambda v, l, w: (f(v, l, w) * cot).sum(), argnums=(0, 1, 2)))(
      value, locations, weights)
  np.testing.assert_allclose(np.asarray(grads[0]), tv.grad.numpy(), atol=ATOL)
  np.testing.assert_allclose(np.asarray(grads[1]), tl.grad.numpy(), atol=ATOL_LOC_GRAD)
  np.testing.assert_allclose(np.asarray(grads[2]), tw.grad.numpy(), atol=ATOL)


def test_core_edge_locations_match_grid_sample():
  """Samples exactly on borders, pixel centres and just outside the map."""
  value, _, _ = _random_inputs(2, nq=6, n_points=4)
  edges = np.array([0.0, 1.0, -1e-3, 1.0 + 1e-3, 0.5 / 7, 1.0 - 0.5 / 4, -0.2, 1.2], np.float32)
  rng = np.random.default_rng(3)
  locations = rng.choice(edges, size=(2, 6, 2, 3, 4, 2)).astype(np.float32)
  weights = rng.uniform(size=(2, 6, 2, 3, 4)).astype(np.float32)
  ref = torch_ms_deform_attn_core(torch.from_numpy(value), SHAPES, torch.from_numpy(locations),
                    torch.from_numpy(weights)).numpy()
  out = ms_deform_attn_core(value, SHAPES, locations, weights)
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_core_rejects_inconsistent_shapes():
  value, locations, weights = _random_inputs(0)
  with pytest.raises(ValueError, match='spatial_shapes'):
    ms_deform_attn_core(value, ((6, 7), (3, 4)), locations, weights)
  with pytest.raises(ValueError, match='attention_weights shape'):
    ms_deform_attn_core(value, SHAPES, locations, weights[..., :2])


def _flax_params(module):
  return {'params': {name: {'kernel': jnp.asarray(getattr(module, name).weight.detach().numpy().T),
                            'bias': jnp.asarray(getattr(module, name).bias.detach().numpy())}
                     for name in ['sampling_offsets', 'attention_weights', 'value_proj',
                                  'output_proj']}}


def test_module_init_matches_deformable_detr():
  torch.manual_seed(0)
  ref = TorchMSDeformAttn(16, 3, 2, 3)
  model = MSDeformAttn(d_model=16, n_levels=3, n_heads=2, n_points=3)
  s = sum(h * w for h, w in SHAPES)
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 4, 16)), jnp.zeros((1, 4, 3, 2)),
                                        jnp.zeros((1, s, 16)), SHAPES))
  params = init(jax.random.key(0))['params']
  np.testing.assert_allclose(np.asarray(params['sampling_offsets']['bias']),
                             ref.sampling_offsets.bias.detach().numpy(), atol=1e-6)
  assert not np.asarray(params['sampling_offsets']['kernel']).any()
  assert not np.asarray(params['attention_weights']['kernel']).any()


@pytest.mark.parametrize('ref_dim,use_mask', [(2, False), (2, True), (4, False)])
def test_module_matches_torch(ref_dim, use_mask):
  torch.manual_seed(1)
  d, hh, n_points, b, nq = 16, 2, 3, 2, 9
  s = sum(h * w for h, w in SHAPES)
  ref = TorchMSDeformAttn(d, len(SHAPES), hh, n_points)
  with torch.no_grad():  # random weights everywhere so every path matters
    for p in ref.parameters():
      p.normal_(0, 0.3)
  rng = np.random.default_rng(4)
  query = rng.normal(size=(b, nq, d)).astype(np.float32)
  feats = rng.normal(size=(b, s, d)).astype(np.float32)
  refs = rng.uniform(0.1, 0.9, size=(b, nq, len(SHAPES), ref_dim)).astype(np.float32)
  mask = rng.uniform(size=(b, s)) < 0.3 if use_mask else None
  expected = ref(torch.from_numpy(query), torch.from_numpy(refs), torch.from_numpy(feats), SHAPES,
                 None if mask is None else torch.from_numpy(mask)).detach().numpy()
  model = MSDeformAttn(d_model=d, n_levels=len(SHAPES), n_heads=hh, n_points=n_points)
  out = jax.jit(lambda p, q, r, f, m: model.apply(p, q, r, f, SHAPES, m))(
      _flax_params(ref), query, refs, feats, mask)
  assert out.shape == (b, nq, d)
  # N(0, 0.3) weights give outputs of magnitude ~10: 1e-4 absolute.
  np.testing.assert_allclose(np.asarray(out), expected, atol=1e-4)


def test_core_bfloat16_values_stay_close_to_float32():
  value, locations, weights = _random_inputs(5)
  core = jax.jit(lambda v: ms_deform_attn_core(v, SHAPES, locations, weights))
  full = core(value)
  half = core(jnp.asarray(value, jnp.bfloat16))
  assert half.dtype == jnp.bfloat16
  # bfloat16 keeps 8 mantissa bits: values of magnitude ~3 round by up to ~1e-2.
  np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(full), atol=3e-2)
  grad = jax.jit(jax.grad(lambda v: core(v).astype(jnp.float32).sum()))(
      jnp.asarray(value, jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16 and np.isfinite(np.asarray(grad, np.float32)).all()


def test_core_far_and_nonfinite_locations_contribute_nothing():
  value, locations, weights = _random_inputs(6, nq=4)
  locations[:, 0] = 3e9  # far outside: float -> int32 must not wrap into the map
  locations[:, 1] = -3e9
  locations[:, 2] = np.inf
  out = jax.jit(lambda l: ms_deform_attn_core(value, SHAPES, l, weights))(locations)
  np.testing.assert_array_equal(np.asarray(out[:, :3]), 0.0)
  ref = torch_ms_deform_attn_core(torch.from_numpy(value), SHAPES,
                                  torch.from_numpy(locations[:, 3:]),
                                  torch.from_numpy(weights[:, 3:])).numpy()
  np.testing.assert_allclose(np.asarray(out[:, 3:]), ref, atol=ATOL)
