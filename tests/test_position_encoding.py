"""Tests for hiseg_jax.layers.position_encoding against torch PositionEmbeddingSine."""

import math

import numpy as np
import pytest
import torch

from hiseg_jax.layers.position_encoding import sine_position_encoding
from torch_references import torch_sine_position_encoding

# float32 sin/cos of identical arguments: agreement to 1e-5 absolute.
ATOL = 1e-5


@pytest.mark.parametrize('normalize', [True, False])
def test_matches_torch_without_mask(normalize):
  h, w = 5, 7
  ref = torch_sine_position_encoding(torch.zeros(1, h, w, dtype=torch.bool), 64, 10000., normalize,
                                     2 * math.pi)
  out = sine_position_encoding(h, w, num_pos_feats=64, normalize=normalize)
  assert out.shape == (h, w, 128)
  np.testing.assert_allclose(np.asarray(out), ref[0], atol=ATOL)


def test_matches_torch_with_padding_mask():
  h, w = 6, 8
  mask = torch.zeros(2, h, w, dtype=torch.bool)
  mask[0, 4:, :] = True
  mask[1, :, 5:] = True
  ref = torch_sine_position_encoding(mask, 128, 20., True, 3.0)
  out = sine_position_encoding(h, w, num_pos_feats=128, temperature=20., scale=3.0,
                               mask=mask.numpy())
  assert out.shape == (2, h, w, 256)
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL)


def test_rejects_bad_mask_shape():
  with pytest.raises(ValueError, match='mask shape'):
    sine_position_encoding(4, 4, mask=np.zeros((2, 4, 5), bool))
