"""ResNet with bottleneck blocks (torchvision layout), returning res2..res5 feature maps (NHWC)."""

from typing import Dict, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from hiseg_jax.layers.pointwise_conv import PointwiseConv

# torchvision initialises convolutions with Kaiming-normal (fan_out, ReLU gain).
_conv_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class FrozenBatchNorm(nn.Module):
  """Batch norm with fixed statistics and affine terms (torchvision `FrozenBatchNorm2d`).

  All four arrays (`scale`, `bias`, `mean`, `var`) live in the 'batch_stats'
  collection, so the optimiser never sees them and nothing updates them.

  Attributes:
    eps: variance epsilon (1e-5 as in torchvision / detectron2).
  """
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Normalises the last axis with the stored statistics.

    Args:
      x: [..., C] input.

    Returns:
      [..., C] output, (x - mean) / sqrt(var + eps) * scale + bias.
    """
    c = x.shape[-1]
    scale = self.variable('batch_stats', 'scale', lambda: jnp.ones((c,), jnp.float32)).value
    bias = self.variable('batch_stats', 'bias', lambda: jnp.zeros((c,), jnp.float32)).value
    mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32)).value
    var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32)).value
    mul = scale * jax.lax.rsqrt(var + self.eps)  # [C]
    return (x * mul + (bias - mean * mul)).astype(x.dtype)  # [..., C]


class GroupNorm(nn.Module):
  """GroupNorm with 32 groups, or one group per channel below 32 channels (detectron2 'GN').

  For a backbone trained from scratch: batch-independent statistics and trainable affine terms
  (`scale`, `bias` in 'params'), unlike `FrozenBatchNorm` on random weights, which normalises
  nothing.

  Attributes:
    groups: the group count for channel counts divisible by it.
    eps: variance epsilon.
  """
  groups: int = 32
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Normalises [..., C] over the spatial axes and the channels of each group.

    Args:
      x: [B, H, W, C] input.

    Returns:
      [B, H, W, C] output.
    """
    c = x.shape[-1]
    groups = self.groups if c % self.groups == 0 else c
    return nn.GroupNorm(num_groups=groups, epsilon=self.eps, name='norm')(x)  # [B, H, W, C]


def _norm(kind: str, train: bool, name: str, scale_init=nn.initializers.ones) -> nn.Module:
  """A 'frozen_bn', 'bn' or 'gn' normalisation layer.

  Args:
    kind: 'frozen_bn' (fixed statistics), 'bn' (batch statistics when training) or 'gn'
      (`GroupNorm`).
    train: whether the network is training (only used by 'bn').
    name: module name.
    scale_init: initialiser of the BN scale (only used by 'bn').

  Returns:
    The Flax module.
  """
  if kind == 'frozen_bn':
    return FrozenBatchNorm(name=name)
  if kind == 'bn':
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        scale_init=scale_init, name=name)
  if kind == 'gn':
    return GroupNorm(name=name)
  raise ValueError(f'resnet: unknown norm {kind!r}; expected "frozen_bn", "bn" or "gn"')


class Bottleneck(nn.Module):
  """Bottleneck block (1x1 -> 3x3 with the stride -> 1x1 x4), torchvision ResNet v1.5.

  Attributes:
    width: bottleneck width; the block outputs 4*width channels.
    stride: stride of the 3x3 convolution (and of the projection shortcut).
    norm: 'frozen_bn', 'bn' or 'gn'.
    dtype: computation dtype.
  """
  width: int
  stride: int = 1
  norm: str = 'frozen_bn'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
    """Applies the block.

    Args:
      x: [B, H, W, C_in] input.
      train: whether training ('bn' uses and updates batch statistics).

    Returns:
      [B, H/stride, W/stride, 4*width] output.
    """

    def conv(f, k, s, name):
      if k == 1:
        return PointwiseConv(f, s, use_bias=False, kernel_init=_conv_init, dtype=self.dtype,
                             name=name)
      return nn.Conv(f, (k, k), (s, s), padding=[(k // 2, k // 2)] * 2, use_bias=False,
                     kernel_init=_conv_init, dtype=self.dtype, name=name)

    out_dim = 4 * self.width
    y = conv(self.width, 1, 1, 'conv1')(x)  # [B, H, W, width]
    y = nn.relu(_norm(self.norm, train, 'bn1')(y))  # [B, H, W, width]
    y = conv(self.width, 3, self.stride, 'conv2')(y)  # [B, H/s, W/s, width]
    y = nn.relu(_norm(self.norm, train, 'bn2')(y))  # [B, H/s, W/s, width]
    y = conv(out_dim, 1, 1, 'conv3')(y)  # [B, H/s, W/s, 4*width]
    y = _norm(self.norm, train, 'bn3')(y)  # [B, H/s, W/s, 4*width]
    if self.stride != 1 or x.shape[-1] != out_dim:
      x = conv(out_dim, 1, self.stride, 'downsample_conv')(x)  # [B, H/s, W/s, 4*width]
      x = _norm(self.norm, train, 'downsample_bn')(x)  # [B, H/s, W/s, 4*width]
    return nn.relu(x + y)  # [B, H/s, W/s, 4*width]


class ResNet(nn.Module):
  """Bottleneck ResNet; defaults are ResNet-50.

  Parameter names follow torchvision with dots replaced: `conv1`, `bn1`,
  `layer{i}_{j}/conv{k}`, `layer{i}_{j}/bn{k}`, `layer{i}_{j}/downsample_conv`
  (torchvision `downsample.0`) and `downsample_bn` (`downsample.1`); conv
  weights transpose from [O, I, kh, kw] to [kh, kw, I, O]. BN scale/bias/mean/var
  are in 'batch_stats' with norm='frozen_bn'; with norm='bn' scale/bias are
  params and mean/var batch_stats.

  The runlocal variant keeps the same strides with fewer, narrower blocks,
  e.g. depths=(1, 1, 1, 1), widths=(16, 32, 64, 128), stem_width=16.

  Attributes:
    depths: bottleneck blocks per stage (res2..res5).
    widths: bottleneck widths per stage; stage outputs are 4*width channels.
    stem_width: channels of the 7x7 stem convolution.
    norm: 'frozen_bn' (fixed statistics, the detection default), 'bn' or 'gn' (GroupNorm, for
      training from scratch).
    dtype: computation dtype.
  """
  depths: Sequence[int] = (3, 4, 6, 3)
  widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  norm: str = 'frozen_bn'
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jnp.ndarray, train: bool = False) -> Dict[str, jnp.ndarray]:
    """Computes the feature pyramid.

    Args:
      images: [B, H, W, 3] normalised images; H and W multiples of 32.
      train: whether training (matters only for norm='bn'; then the
        'batch_stats' collection must be mutable).

    Returns:
      {'stem': [B, H/2, W/2, stem_width] (the stem after its norm and ReLU, before the
       max pool), 'res2': [B, H/4, W/4, 4*widths[0]], 'res3': [B, H/8, W/8, 4*widths[1]],
       'res4': [B, H/16, W/16, 4*widths[2]], 'res5': [B, H/32, W/32, 4*widths[3]]}.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'ResNet: images shape {images.shape} is not [B, H, W, 3]')
    if images.shape[1] % 32 or images.shape[2] % 32:
      raise ValueError(f'ResNet: image size {images.shape[1:3]} is not a multiple of 32')
    if len(self.depths) != 4 or len(self.widths) != 4:
      raise ValueError(f'ResNet: depths {self.depths} and widths {self.widths} need 4 stages')
    x = nn.Conv(self.stem_width, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False,
                kernel_init=_conv_init, dtype=self.dtype,
                name='conv1')(images)  # [B, H/2, W/2, stem]
    x = nn.relu(_norm(self.norm, train, 'bn1')(x))  # [B, H/2, W/2, stem]
    features = {'stem': x}
    x = nn.max_pool(x, (3, 3), (2, 2), padding=[(1, 1), (1, 1)])  # [B, H/4, W/4, stem]
    for stage, (depth, width) in enumerate(zip(self.depths, self.widths)):
      for block in range(depth):
        stride = 2 if block == 0 and stage > 0 else 1
        x = Bottleneck(width, stride, self.norm, self.dtype,
                       name=f'layer{stage + 1}_{block}')(x, train)  # [B, H/s, W/s, 4*width]
      features[f'res{stage + 2}'] = x
    return features
