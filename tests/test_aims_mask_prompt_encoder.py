"""Tests for the AIMS mask prompt encoder against a torch transcription of Eq. 10-11."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.aims.mask_prompt_encoder import MaskPromptEncoder

# float32, same operations in a different order: agreement to 1e-5 absolute.
ATOL = 1e-5


class TorchMPE(torch.nn.Module):
  """Torch transcription of AIMS's MPE: CONV2+LN+GELU, CONV2+LN+GELU, CONV1, bilinear downscales."""

  def __init__(self, hidden, out_dim):
    super().__init__()
    self.conv0 = torch.nn.Conv2d(1, hidden[0], kernel_size=2, stride=2)
    self.norm0 = torch.nn.LayerNorm(hidden[0], eps=1e-6)
    self.conv1 = torch.nn.Conv2d(hidden[0], hidden[1], kernel_size=2, stride=2)
    self.norm1 = torch.nn.LayerNorm(hidden[1], eps=1e-6)
    self.conv2 = torch.nn.Conv2d(hidden[1], out_dim, kernel_size=1)

  def forward(self, mask):
    x = mask[:, None]  # [B, 1, H, W]
    for conv, norm in ((self.conv0, self.norm0), (self.conv1, self.norm1)):
      x = conv(x)
      x = norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LN over channels
      x = F.gelu(x)  # exact erf GELU
    m2 = self.conv2(x)  # [B, C, H/4, W/4]
    scaled = [F.interpolate(m2, scale_factor=s, mode='bilinear', align_corners=False)
              for s in (0.5, 0.25, 0.125)]
    return [m2] + scaled


def _flax_params_from_torch(ref):
  """The torch module's weights as the Flax MPE's params."""
  conv = lambda c: {'kernel': jnp.asarray(c.weight.detach().numpy().transpose(2, 3, 1, 0)),
                    'bias': jnp.asarray(c.bias.detach().numpy())}
  norm = lambda n: {'scale': jnp.asarray(n.weight.detach().numpy()),
                    'bias': jnp.asarray(n.bias.detach().numpy())}
  return {'params': {'conv_0': conv(ref.conv0), 'norm_0': norm(ref.norm0),
                     'conv_1': conv(ref.conv1), 'norm_1': norm(ref.norm1),
                     'conv_2': conv(ref.conv2)}}


def test_mpe_layer_structure_and_shapes():
  b, h, w, c = 2, 64, 96, 32
  sizes = [(16, 24), (8, 12), (4, 6), (2, 3)]
  mpe = MaskPromptEncoder(out_dim=c, hidden_dims=(4, 16))
  variables = mpe.init(jax.random.PRNGKey(0), jnp.ones((b, h, w)), sizes)
  shapes = jax.tree.map(jnp.shape, variables['params'])
  assert shapes == {
      'conv_0': {'kernel': (2, 2, 1, 4), 'bias': (4,)},
      'norm_0': {'scale': (4,), 'bias': (4,)},
      'conv_1': {'kernel': (2, 2, 4, 16), 'bias': (16,)},
      'norm_1': {'scale': (16,), 'bias': (16,)},
      'conv_2': {'kernel': (1, 1, 16, c), 'bias': (c,)},
  }
  outs = mpe.apply(variables, jnp.ones((b, h, w)), sizes)
  assert [o.shape for o in outs] == [(b,) + s + (c,) for s in sizes]


def test_mpe_matches_torch_transcription():
  b, h, w, c = 2, 64, 64, 24
  torch.manual_seed(0)
  ref = TorchMPE((4, 16), c)
  with torch.no_grad():
    for norm in (ref.norm0, ref.norm1):
      norm.weight.normal_()
      norm.bias.normal_()
  rng = np.random.default_rng(0)
  prompt = (rng.random((b, h, w)) > 0.5).astype(np.float32)
  prompt[0, :20, :] = 1.0  # a solid band next to noise
  expected = [t.detach().numpy().transpose(0, 2, 3, 1) for t in ref(torch.from_numpy(prompt))]
  sizes = [e.shape[1:3] for e in expected]
  assert sizes == [(16, 16), (8, 8), (4, 4), (2, 2)]
  outs = MaskPromptEncoder(out_dim=c).apply(_flax_params_from_torch(ref), prompt, sizes)
  for out, exp in zip(outs, expected):
    np.testing.assert_allclose(np.asarray(out), exp, atol=ATOL)


def test_mpe_rejects_bad_prompt_shape():
  mpe = MaskPromptEncoder(out_dim=8)
  with pytest.raises(ValueError, match='divisible by 4'):
    mpe.init(jax.random.PRNGKey(0), jnp.ones((1, 30, 32)), [(7, 8)])


def test_mpe_upscales_m2_for_stride_2_mask_features():
  b, h, w, c = 1, 32, 32, 8
  torch.manual_seed(1)
  ref = TorchMPE((4, 16), c)
  prompt = (np.random.default_rng(1).random((b, h, w)) > 0.5).astype(np.float32)
  with torch.no_grad():
    m2 = ref(torch.from_numpy(prompt))[0]
    expected = F.interpolate(m2, scale_factor=2, mode='bilinear', align_corners=False)
  outs = MaskPromptEncoder(out_dim=c).apply(_flax_params_from_torch(ref), prompt,
                                            [(16, 16), (8, 8), (4, 4)])
  assert [o.shape for o in outs] == [(b, 16, 16, c), (b, 8, 8, c), (b, 4, 4, c)]
  np.testing.assert_allclose(np.asarray(outs[0]), expected.numpy().transpose(0, 2, 3, 1),
                             atol=ATOL)
