"""Initialisers that reproduce PyTorch / detectron2 defaults for Flax layers.

* `torch_default_kernel`: torch's default `nn.Linear` / `nn.Conv2d` weight init,
  `kaiming_uniform_(a=sqrt(5))` = U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
* `torch_default_bias(fan_in)`: torch's default bias init, the same uniform range.
* `kaiming_uniform_a1`: `kaiming_uniform_(a=1)` = U(-sqrt(3/fan_in), sqrt(3/fan_in)), detectron2's
  `c2_xavier_fill` and CondInst's conv init.
* `prior_bias(p)`: the focal-loss prior bias, constant -log((1 - p) / p).

Flax's fan-in of a Dense kernel [in, out] is `in`, and of a Conv kernel [kh, kw, in, out] is
`kh * kw * in`, as torch computes it.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

torch_default_kernel = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
kaiming_uniform_a1 = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')


def torch_default_bias(fan_in: int) -> nn.initializers.Initializer:
  """torch's default Linear / Conv bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

  Args:
    fan_in: input width of the layer (in_features, or in_channels * kh * kw).

  Returns:
    An initialiser (key, shape, dtype) -> array; it also serves as a kernel init with an
    explicit fan-in.
  """
  if fan_in < 1:
    raise ValueError(f'torch_default_bias: fan_in={fan_in} must be >= 1')
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def prior_bias(prior_prob: float) -> nn.initializers.Initializer:
  """Constant bias -log((1 - p) / p), so that sigmoid(bias) = p (focal-loss prior).

  Args:
    prior_prob: prior probability p in (0, 1) (0.01 in HIPIE).

  Returns:
    A constant initialiser.
  """
  if not 0.0 < prior_prob < 1.0:
    raise ValueError(f'prior_bias: prior_prob={prior_prob} must lie in (0, 1)')
  return nn.initializers.constant(-math.log((1 - prior_prob) / prior_prob))
