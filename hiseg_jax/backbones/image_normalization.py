"""The input normalisation of every backbone: ImageNet mean and std in 0..255.

The detectron2 / torchvision convention (the PIXEL_MEAN / PIXEL_STD of the AIMS and HIPIE
reference configs), applied to the uint8 canvases of the data pipelines.
"""

import jax
import jax.numpy as jnp

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)


def normalize_image(image: jax.Array) -> jax.Array:
  """uint8 [B, H, W, 3] -> float32 normalised with the ImageNet statistics.

  Args:
    image: uint8 or float [B, H, W, 3] in 0..255.

  Returns:
    float32 [B, H, W, 3].
  """
  mean = jnp.asarray(PIXEL_MEAN, jnp.float32)  # [3]
  std = jnp.asarray(PIXEL_STD, jnp.float32)  # [3]
  return (image.astype(jnp.float32) - mean) / std  # [B, H, W, 3]
