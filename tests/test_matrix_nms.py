"""Matrix NMS against a torch transcription of SOLOv2's `matrix_nms` (Gaussian kernel)."""

import numpy as np
import pytest
import torch

from hiseg_jax.postprocess.matrix_nms import matrix_nms_decay
from torch_references import torch_matrix_nms


def test_matrix_nms_matches_solov2():
  rng = np.random.default_rng(0)
  base = rng.random((2, 3, 12, 12)) > 0.5
  # Near-duplicates of the base masks (a few flipped pixels), so decays span (0, 1].
  noisy = base[:, rng.integers(0, 3, 6)] ^ (rng.random((2, 6, 12, 12)) > 0.9)
  masks = np.concatenate([base, noisy], axis=1)  # [2, 9, 12, 12]
  scores = np.sort(rng.random((2, 9)).astype(np.float32), axis=1)[:, ::-1].copy()
  got = np.asarray(matrix_nms_decay(masks, scores))
  for b in range(2):
    ref = torch_matrix_nms(torch.from_numpy(masks[b]), torch.from_numpy(scores[b])).numpy()
    np.testing.assert_allclose(got[b], ref, rtol=1e-5)  # float32 exp and division
  assert got[:, 0].tolist() == scores[:, 0].tolist()  # the best mask keeps its score
  assert (got <= scores + 1e-7).all() and (got[:, 3:] < 0.9 * scores[:, 3:]).any()


def test_matrix_nms_keeps_disjoint_masks_and_checks_shapes():
  masks = np.zeros((1, 3, 4, 4), bool)
  masks[0, 0, :2] = True
  masks[0, 1, 2:] = True  # the third mask stays empty
  scores = np.array([[0.9, 0.5, 0.2]], np.float32)
  np.testing.assert_allclose(np.asarray(matrix_nms_decay(masks, scores)), scores)
  with pytest.raises(ValueError, match="must be"):
    matrix_nms_decay(masks, scores[:, :2])
