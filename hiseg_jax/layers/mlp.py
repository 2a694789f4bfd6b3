"""Multi-layer perceptron with ReLU between layers (DETR's `MLP`)."""

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLP(nn.Module):
  """`num_layers` Dense layers with ReLU between them (none after the last).

  Parameters are named `layers_0` ... `layers_{num_layers-1}`, matching the
  `layers.{i}` entries of DETR's torch `MLP`.

  Attributes:
    hidden_dim: width of every hidden layer.
    output_dim: width of the last layer.
    num_layers: number of Dense layers (>= 1).
    dtype: computation dtype.
  """
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Applies the MLP to the last axis.

    Args:
      x: [..., D_in] input.

    Returns:
      [..., output_dim] output.
    """
    if self.num_layers < 1:
      raise ValueError(f'MLP: num_layers={self.num_layers} must be >= 1')
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      width = self.output_dim if last else self.hidden_dim
      x = nn.Dense(width, dtype=self.dtype, name=f'layers_{i}')(x)  # [..., width]
      if not last:
        x = jax.nn.relu(x)  # [..., hidden_dim]
    return x
