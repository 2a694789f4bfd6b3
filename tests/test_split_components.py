"""Connected-component splitting of predicted masks, alone and inside the AIMS evaluation."""

import numpy as np
import pytest

from eval import aims_eval
from hiseg_jax.postprocess.components import split_components


def _masks():
  """Three 6x8 masks: two blobs (3 px and 1 px), one diagonal chain, one empty -> [3, 6, 8]."""
  masks = np.zeros((3, 6, 8), bool)
  masks[0, 0, 0:3] = True  # 3 px
  masks[0, 4, 6] = True  # 1 px, apart
  masks[1, 1, 1] = masks[1, 2, 2] = masks[1, 3, 3] = True  # touching at corners only
  return masks


def test_each_component_becomes_a_prediction_scored_by_its_area_share():
  masks = _masks()
  out, scores, source = split_components(masks, np.array([0.8, 0.5, 0.3]))
  np.testing.assert_array_equal(source, [0, 0, 1, 2])
  np.testing.assert_allclose(scores, [0.8 * 3 / 4, 0.8 * 1 / 4, 0.5, 0.3], rtol=1e-12)
  assert out.shape == (4, 6, 8) and out.dtype == bool
  np.testing.assert_array_equal(out[0], np.pad(np.ones((1, 3), bool), ((0, 5), (0, 5))))
  assert out[1].sum() == 1 and out[1][4, 6]
  np.testing.assert_array_equal(out[2], masks[1])  # 8-connected: one component
  assert not out[3].any()
  np.testing.assert_array_equal(out.sum(0) > 0, masks.any(0))


def test_no_masks_and_bad_shapes():
  out, scores, source = split_components(np.zeros((0, 4, 4), bool), np.zeros([0]))
  assert out.shape == (0, 4, 4) and scores.shape == (0,) and source.shape == (0,)
  with pytest.raises(ValueError, match=r'masks must be \[K, H, W\] and scores \[K\]'):
    split_components(np.zeros((2, 4, 4), bool), np.zeros([3]))
  with pytest.raises(ValueError, match=r'masks must be \[K, H, W\] and scores \[K\]'):
    split_components(np.zeros((4, 4), bool), np.zeros([4]))


@pytest.mark.parametrize('split_levels', [(), ('part',), ('part', 'entity')])
def test_image_predictions_split_levels_and_follow_the_association(split_levels):
  # Logits on an 8x8 canvas equal to the 8x8 image: +10 inside, -10 outside.
  parts = np.zeros((2, 8, 8), bool)  # [2, 8, 8]
  parts[0, 0:2, 0:2] = parts[0, 5:8, 5:8] = True  # two blobs: 4 px and 9 px
  parts[1, 3, 3] = True
  entities = np.zeros((1, 8, 8), bool)  # [1, 8, 8]
  entities[0, 0:2, 0:2] = entities[0, 5:8, 0:2] = True  # two blobs: 4 px and 6 px
  assoc = np.array([[0.9, 0.2]], np.float32)  # [1, 2]
  pred = {'part': {'mask_logits': np.where(parts, 10.0, -10.0), 'scores': np.array([0.6, 0.4])},
          'entity': {'mask_logits': np.where(entities, 10.0, -10.0), 'scores': np.array([0.5])},
          'assoc_ep': assoc}
  masks, scores, pair_assoc = aims_eval.image_predictions(
      pred, ('entity', 'part'), 'assoc_ep', 8, (8, 8), (8, 8), split_levels)
  if 'part' in split_levels:
    np.testing.assert_allclose(scores['part'], [0.6 * 4 / 13, 0.6 * 9 / 13, 0.4], rtol=1e-6)
    np.testing.assert_array_equal(masks['part'].sum((1, 2)), [4, 9, 1])
  else:
    np.testing.assert_allclose(scores['part'], [0.6, 0.4], rtol=1e-6)
    np.testing.assert_array_equal(masks['part'], parts)
  if 'entity' in split_levels:
    np.testing.assert_allclose(scores['entity'], [0.5 * 4 / 10, 0.5 * 6 / 10], rtol=1e-6)
    np.testing.assert_array_equal(masks['entity'].sum((1, 2)), [4, 6])
  else:
    np.testing.assert_array_equal(masks['entity'], entities)
  rows = 2 if 'entity' in split_levels else 1
  cols = [0.9, 0.9, 0.2] if 'part' in split_levels else [0.9, 0.2]
  np.testing.assert_allclose(pair_assoc, np.tile(np.array([cols], np.float32), (rows, 1)))
  del pred['assoc_ep']
  assert aims_eval.image_predictions(pred, ('entity', 'part'), 'assoc_ep', 8, (8, 8), (8, 8),
                                     split_levels)[2] is None
