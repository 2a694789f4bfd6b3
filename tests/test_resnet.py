"""Tests for hiseg_jax.backbones.resnet against a torch transcription of torchvision's ResNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hiseg_jax.backbones.resnet import GroupNorm
from hiseg_jax.backbones.resnet import ResNet

TINY = dict(depths=(1, 2, 1, 1), widths=(4, 8, 8, 16), stem_width=8)
# float32 convolutions in different orders through ~20 layers: 1e-4 relative.
RTOL, ATOL = 1e-4, 1e-4


class _TorchBottleneck(torch.nn.Module):
  """Transcription of torchvision's Bottleneck (stride on the 3x3 conv)."""

  def __init__(self, cin, width, stride):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(cin, width, 1, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(width)
    self.conv2 = torch.nn.Conv2d(width, width, 3, stride, 1, bias=False)
    self.bn2 = torch.nn.BatchNorm2d(width)
    self.conv3 = torch.nn.Conv2d(width, 4 * width, 1, bias=False)
    self.bn3 = torch.nn.BatchNorm2d(4 * width)
    self.downsample = None
    if stride != 1 or cin != 4 * width:
      self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, 4 * width, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(4 * width))

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    identity = x if self.downsample is None else self.downsample(x)
    return torch.relu(out + identity)


class _TorchResNet(torch.nn.Module):
  """Transcription of torchvision's ResNet body returning the stem and the four stage outputs."""

  def __init__(self, depths, widths, stem_width):
    super().__init__()
    self.conv1 = torch.nn.Conv2d(3, stem_width, 7, 2, 3, bias=False)
    self.bn1 = torch.nn.BatchNorm2d(stem_width)
    self.maxpool = torch.nn.MaxPool2d(3, 2, 1)
    cin = stem_width
    for i, (depth, width) in enumerate(zip(depths, widths)):
      blocks = []
      for j in range(depth):
        blocks.append(_TorchBottleneck(cin, width, 2 if j == 0 and i > 0 else 1))
        cin = 4 * width
      setattr(self, f'layer{i + 1}', torch.nn.Sequential(*blocks))

  def forward(self, x):
    stem = torch.relu(self.bn1(self.conv1(x)))
    x = self.maxpool(stem)
    outs = {'stem': stem}
    for i in range(4):
      x = getattr(self, f'layer{i + 1}')(x)
      outs[f'res{i + 2}'] = x
    return outs


def _convert(state_dict, frozen):
  """torchvision-style state dict -> Flax variables of our ResNet."""
  params, stats = {}, {}
  for key, value in state_dict.items():
    path = key.replace('.downsample.0.', '.downsample_conv.').replace('.downsample.1.',
                                                                      '.downsample_bn.')
    parts = path.split('.')
    if parts[0].startswith('layer'):
      parts = [f'{parts[0]}_{parts[1]}'] + parts[2:]
    *module, leaf = parts
    v = value.detach().numpy()
    if leaf == 'num_batches_tracked':
      continue
    if v.ndim == 4:
      tree, leaf, v = params, 'kernel', v.transpose(2, 3, 1, 0)
    elif leaf in ('running_mean', 'running_var'):
      tree, leaf = stats, {'running_mean': 'mean', 'running_var': 'var'}[leaf]
    else:
      leaf = {'weight': 'scale', 'bias': 'bias'}[leaf]
      tree = stats if frozen else params
    node = tree
    for m in module:
      node = node.setdefault(m, {})
    node[leaf] = jnp.asarray(v)
  return {'params': params, 'batch_stats': stats}


def _random_torch_resnet(seed):
  torch.manual_seed(seed)
  net = _TorchResNet(**TINY).eval()
  with torch.no_grad():
    for m in net.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0, 0.2)
        m.running_mean.normal_(0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  return net


@pytest.mark.parametrize('norm', ['frozen_bn', 'bn'])
def test_tiny_resnet_matches_torchvision_transcription(norm):
  net = _random_torch_resnet(0)
  images = np.random.default_rng(0).normal(size=(2, 64, 96, 3)).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  variables = _convert(net.state_dict(), frozen=norm == 'frozen_bn')
  model = ResNet(norm=norm, **TINY)
  expected_tree = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 96, 3)))
  assert jax.tree.structure(expected_tree) == jax.tree.structure(variables)
  out = jax.jit(model.apply)(variables, images)
  for name, stride, channels in [('stem', 2, 8), ('res2', 4, 16), ('res3', 8, 32),
                                 ('res4', 16, 32), ('res5', 32, 64)]:
    assert out[name].shape == (2, 64 // stride, 96 // stride, channels)
    np.testing.assert_allclose(np.asarray(out[name]),
                               ref[name].numpy().transpose(0, 2, 3, 1), rtol=RTOL, atol=ATOL)


def test_frozen_bn_has_no_trainable_norm_and_no_updates():
  model = ResNet(**TINY)
  images = jnp.ones((1, 64, 64, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  assert not any('bn' in jax.tree_util.keystr(path)
                 for path, _ in jax.tree_util.tree_leaves_with_path(variables['params']))
  assert set(variables['batch_stats']['bn1']) == {'scale', 'bias', 'mean', 'var'}
  variables = _convert(_random_torch_resnet(1).state_dict(), frozen=True)
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, images)
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(variables['batch_stats'])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bn_updates_statistics_when_training():
  model = ResNet(norm='bn', **TINY)
  images = jax.random.normal(jax.random.key(1), (2, 64, 64, 3))
  variables = _convert(_random_torch_resnet(1).state_dict(), frozen=False)
  _, updates = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, images)
  before = variables['batch_stats']['bn1']['mean']
  assert not np.allclose(np.asarray(updates['batch_stats']['bn1']['mean']), np.asarray(before))


def test_resnet50_shapes():
  model = ResNet()
  images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  out = jax.eval_shape(model.apply, variables, images)
  assert {k: v.shape for k, v in out.items()} == {
      'stem': (2, 64, 64, 64), 'res2': (2, 32, 32, 256), 'res3': (2, 16, 16, 512),
      'res4': (2, 8, 8, 1024), 'res5': (2, 4, 4, 2048)}
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables['params']))
  # torchvision ResNet-50 has 25,557,032 parameters: minus fc (2,049,000) and the BN affine
  # terms (53,120, frozen here) leaves 23,454,912 convolution weights.
  assert n_params == 23454912


def test_resnet_rejects_bad_images():
  with pytest.raises(ValueError, match='multiple of 32'):
    jax.eval_shape(ResNet(**TINY).init, jax.random.key(0), jnp.zeros((1, 60, 64, 3)))
  with pytest.raises(ValueError, match='unknown norm'):
    jax.eval_shape(ResNet(norm='ln', **TINY).init, jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


@pytest.mark.parametrize('channels, groups', [(64, 32), (16, 16)])
def test_group_norm_matches_torch(channels, groups):
  rng = np.random.default_rng(channels)
  x = rng.normal(2.0, 3.0, size=(2, 5, 7, channels)).astype(np.float32)
  scale = rng.normal(size=channels).astype(np.float32)
  bias = rng.normal(size=channels).astype(np.float32)
  out = GroupNorm().apply({'params': {'norm': {'scale': scale, 'bias': bias}}}, x)
  ref = torch.nn.functional.group_norm(torch.from_numpy(x.transpose(0, 3, 1, 2)), groups,
                                       torch.from_numpy(scale), torch.from_numpy(bias), 1e-5)
  np.testing.assert_allclose(np.asarray(out), ref.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-5, atol=1e-5)


def test_gn_resnet_has_trainable_norms_and_no_statistics():
  model = ResNet(norm='gn', **TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.ones((1, 64, 64, 3)))
  assert set(variables) == {'params'}
  assert set(variables['params']['bn1']['norm']) == {'scale', 'bias'}
  with pytest.raises(ValueError, match='unknown norm'):
    ResNet(norm='ln', **TINY).init(jax.random.key(0), jnp.ones((1, 64, 64, 3)))
