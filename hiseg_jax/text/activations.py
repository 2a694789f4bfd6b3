"""Activation functions named as in Hugging Face configs (`hidden_act`)."""

from typing import Callable

import jax
import jax.numpy as jnp


def quick_gelu(x: jnp.ndarray) -> jnp.ndarray:
  """CLIP's sigmoid approximation of GELU, x * sigmoid(1.702 x).

  Args:
    x: [...] input.

  Returns:
    [...] activated input.
  """
  return x * jax.nn.sigmoid(1.702 * x)  # [...]


def _exact_gelu(x: jnp.ndarray) -> jnp.ndarray:
  return jax.nn.gelu(x, approximate=False)  # [...]


def _tanh_gelu(x: jnp.ndarray) -> jnp.ndarray:
  return jax.nn.gelu(x, approximate=True)  # [...]


_ACTIVATIONS = {
    'gelu': _exact_gelu,
    'gelu_new': _tanh_gelu,
    'gelu_pytorch_tanh': _tanh_gelu,
    'quick_gelu': quick_gelu,
    'relu': jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """Returns the activation a Hugging Face config names in `hidden_act`.

  Args:
    name: one of 'gelu' (exact, erf-based), 'gelu_new' / 'gelu_pytorch_tanh'
      (tanh approximation), 'quick_gelu', 'relu'.

  Returns:
    The elementwise activation function.
  """
  if name not in _ACTIVATIONS:
    raise ValueError(f'hidden_act {name!r} is not supported; expected one of '
                     f'{sorted(_ACTIVATIONS)}')
  return _ACTIVATIONS[name]
