"""PointwiseConv against flax's nn.Conv with a 1x1 kernel (same parameters, same outputs)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hiseg_jax.layers.init import kaiming_uniform_a1
from hiseg_jax.layers.pointwise_conv import PointwiseConv


def _pair(features, strides, use_bias, **kwargs):
  ours = PointwiseConv(features, strides, use_bias=use_bias, **kwargs)
  reference = nn.Conv(features, (1, 1), (strides, strides), padding=[(0, 0), (0, 0)],
                      use_bias=use_bias, **kwargs)
  return ours, reference


@pytest.mark.parametrize('shape,strides,use_bias', [
    ((2, 8, 6, 5), 1, True),
    ((2, 8, 6, 5), 2, False),
    ((1, 7, 9, 3), 2, True),  # odd sides: the strided conv keeps ceil(H/2) rows
])
def test_matches_conv_forward_and_gradients(shape, strides, use_bias):
  x = jax.random.normal(jax.random.key(0), shape)  # [B, H, W, C_in]
  ours, reference = _pair(7, strides, use_bias, kernel_init=kaiming_uniform_a1)
  params = reference.init(jax.random.key(1), x)
  # Same names, shapes and initial values: checkpoints and converters are unchanged.
  ours_params = ours.init(jax.random.key(1), x)
  jax.tree.map(np.testing.assert_array_equal, ours_params, params)

  y = ours.apply(params, x)
  y_ref = reference.apply(params, x)
  assert y.shape == y_ref.shape
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)

  cotangent = jax.random.normal(jax.random.key(2), y.shape)

  def loss(module):
    return lambda p, inputs: jnp.sum(module.apply(p, inputs) * cotangent)

  grads = jax.grad(loss(ours), argnums=(0, 1))(params, x)
  grads_ref = jax.grad(loss(reference), argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4),
               grads, grads_ref)


def test_computation_dtype_as_conv():
  x = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))  # [B, H, W, C_in]
  ours, reference = _pair(5, 1, True, dtype=jnp.bfloat16)
  params = ours.init(jax.random.key(1), x)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))  # param_dtype
  y = ours.apply(params, x)
  assert y.dtype == reference.apply(params, x).dtype == jnp.bfloat16


def test_rejects_non_image_input():
  with pytest.raises(ValueError, match=r'PointwiseConv .*\(2, 3\) is not \[B, H, W, C\]'):
    PointwiseConv(4).init(jax.random.key(0), jnp.zeros((2, 3)))
