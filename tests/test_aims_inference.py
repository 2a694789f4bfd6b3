"""Tests for AIMS one-step inference against a NumPy/torch transcription of the scoring rule."""

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch_references import torch_matrix_nms

from hiseg_jax.aims.inference import one_step
from hiseg_jax.aims.inference import prompt_inference
from hiseg_jax.aims.inference import restrict_to_prompt

B, H4 = 2, 4
COUNTS = {'part': 6, 'entity': 5, 'relation': 4}


def _outputs(seed=0, with_assoc=True):
  rng = np.random.default_rng(seed)
  out = {k: {'logits': rng.normal(size=(B, q)).astype(np.float32),
             'masks': (3 * rng.normal(size=(B, q, H4, H4))).astype(np.float32)}
         for k, q in COUNTS.items()}
  if with_assoc:
    out['assoc_ep'] = rng.normal(size=(B, 5, 6)).astype(np.float32)
    out['assoc_re'] = rng.normal(size=(B, 4, 5)).astype(np.float32)
  return out


def _reference(logits, masks, valid_hw, top_k):
  """Mask2Former-style scoring: top-k objectness, upsample, binarise, mean prob inside."""
  prob = 1 / (1 + np.exp(-logits.astype(np.float64)))
  res = []
  for b in range(logits.shape[0]):
    idx = np.argsort(-prob[b], kind='stable')[:top_k]
    up = F.interpolate(torch.from_numpy(masks[b][idx])[None], scale_factor=4,
                       mode='bilinear', align_corners=False)[0].numpy()
    p = 1 / (1 + np.exp(-up.astype(np.float64)))
    binary = p > 0.5
    binary[:, valid_hw[b][0]:, :] = False
    binary[:, :, valid_hw[b][1]:] = False
    score = prob[b][idx] * (p * binary).sum((1, 2)) / (binary.sum((1, 2)) + 1e-6)
    order = np.argsort(-score, kind='stable')
    res.append((idx[order], score[order], binary[order]))
  return res


def test_one_step_matches_reference_scoring():
  outputs = _outputs()
  valid_hw = np.array([[16, 16], [12, 8]], np.int32)
  top_k = 3
  result = jax.jit(one_step, static_argnames=('canvas_hw', 'top_k'))(outputs, valid_hw, (16, 16),
                                                                   top_k=top_k)
  for level, q in COUNTS.items():
    r = result[level]
    assert r['masks'].shape == (B, top_k, 16, 16) and r['masks'].dtype == bool
    assert r['scores'].shape == (B, top_k) and r['indices'].shape == (B, top_k)
    assert np.all(np.diff(np.asarray(r['scores']), axis=1) <= 0)
    ref = _reference(outputs[level]['logits'], outputs[level]['masks'], valid_hw, top_k)
    for b, (idx, score, binary) in enumerate(ref):
      np.testing.assert_array_equal(np.asarray(r['indices'][b]), idx)
      # float32 vs float64 probabilities: 1e-5.
      np.testing.assert_allclose(np.asarray(r['scores'][b]), score, atol=1e-5)
      np.testing.assert_array_equal(np.asarray(r['masks'][b]), binary)
      # The returned logits are the selected queries' own, in the returned order.
      np.testing.assert_array_equal(np.asarray(r['mask_logits'][b]),
                                    outputs[level]['masks'][b][idx])
  assert not np.asarray(result['part']['masks'])[1, :, 12:, :].any()
  sig = lambda x: 1 / (1 + np.exp(-x))
  for key, hi, lo in (('assoc_ep', 'entity', 'part'), ('assoc_re', 'relation', 'entity')):
    a = np.asarray(result[key])
    assert a.shape == (B, top_k, top_k)
    for b in range(B):
      rows = np.asarray(result[hi]['indices'][b])
      cols = np.asarray(result[lo]['indices'][b])
      np.testing.assert_allclose(a[b], sig(outputs[key][b][rows][:, cols]), atol=1e-6)


def test_one_step_matrix_nms_rescores_and_resorts():
  outputs = _outputs(seed=3)
  valid_hw = np.array([[16, 16], [12, 8]], np.int32)
  result = jax.jit(one_step, static_argnames=('canvas_hw', 'top_k', 'mask_nms'))(
      outputs, valid_hw, (16, 16), top_k=4, mask_nms=True)
  for level in COUNTS:
    ref = _reference(outputs[level]['logits'], outputs[level]['masks'], valid_hw, 4)
    for b, (idx, score, binary) in enumerate(ref):
      decayed = torch_matrix_nms(torch.from_numpy(binary), torch.from_numpy(score)).numpy()
      order = np.argsort(-decayed, kind='stable')
      np.testing.assert_array_equal(np.asarray(result[level]['indices'][b]), idx[order])
      # float32 vs float64 scores: 1e-5.
      np.testing.assert_allclose(np.asarray(result[level]['scores'][b]), decayed[order],
                                 atol=1e-5)
      np.testing.assert_array_equal(np.asarray(result[level]['masks'][b]), binary[order])


def test_one_step_without_association_and_top_k_clipped():
  result = one_step(_outputs(with_assoc=False), np.array([[16, 16]] * B), (16, 16), top_k=100)
  assert 'assoc_ep' not in result and 'assoc_re' not in result
  for level, q in COUNTS.items():
    assert result[level]['scores'].shape == (B, q)


def test_one_step_rejects_bad_valid_hw():
  with pytest.raises(ValueError, match='image_valid_hw'):
    one_step(_outputs(), np.array([16, 16]), (16, 16))


def _restrict_reference(masks, scores, indices, prompt, min_inside=0.5):
  """NumPy transcription of the prompt restriction for one image."""
  inside = (masks & prompt).sum((1, 2))
  keep = (inside > 0) & (inside > min_inside * masks.sum((1, 2)))
  new_scores = np.where(keep, scores, 0.0)
  order = np.argsort(-new_scores, kind='stable')
  return (masks & prompt)[order], new_scores[order], keep[order], indices[order]


def test_restrict_to_prompt_matches_reference():
  rng = np.random.default_rng(0)
  k, s = 6, 16
  prompt = np.zeros((B, s, s), bool)
  prompt[:, 2:12, 4:14] = True
  masks = np.zeros((B, k, s, s), bool)
  masks[:, 0, 3:8, 5:9] = True  # fully inside
  masks[:, 1, 10:16, 10:16] = True  # 4 of 36 pixels inside: dropped
  masks[:, 2, 0:6, 0:8] = True  # 16 of 48 inside: dropped
  masks[:, 3, 6:12, 8:16] = True  # 36 of 48 inside: kept
  masks[:, 5] = rng.random((B, s, s)) > 0.7  # ~39% inside: dropped
  scores = np.sort(rng.random((B, k)).astype(np.float32), axis=1)[:, ::-1].copy()
  indices = np.stack([rng.permutation(k) for _ in range(B)]).astype(np.int32)
  res = jax.jit(restrict_to_prompt)({'masks': masks, 'scores': scores, 'indices': indices},
                                    prompt)
  for b in range(B):
    exp = _restrict_reference(masks[b], scores[b], indices[b], prompt[b])
    for got, want in zip((res['masks'], res['scores'], res['keep'], res['indices']), exp):
      np.testing.assert_array_equal(np.asarray(got[b]), want)
    np.testing.assert_array_equal(np.asarray(res['keep'][b]), [1, 1, 0, 0, 0, 0])


def test_prompt_inference_runs_the_prompted_model():
  from test_aims_model import B as MB, S, build_aims_model, random_variables, tiny_model_config
  model = build_aims_model(tiny_model_config())
  variables = random_variables(model)
  rng = np.random.default_rng(0)
  image = rng.normal(size=(MB, S, S, 3)).astype(np.float32)
  prompt = np.zeros((MB, S, S), bool)
  prompt[:, 4:44, 8:56] = True
  valid_hw = np.array([[S, S]] * MB, np.int32)

  @jax.jit
  def run(variables, image, prompt):
    outputs = model.apply(variables, image, prompt)
    ref = restrict_to_prompt(one_step(outputs, valid_hw, (S, S), top_k=5)['part'], prompt)
    return prompt_inference(model, variables, image, prompt, 'part', top_k=5), ref

  res, ref = run(variables, image, prompt)
  assert res['masks'].shape == (MB, 5, S, S) and res['scores'].shape == (MB, 5)
  assert not np.asarray(res['masks'])[:, :, ~prompt[0]].any()
  assert np.all(np.diff(np.asarray(res['scores']), axis=1) <= 0)
  for key in ('masks', 'keep', 'indices'):
    np.testing.assert_array_equal(np.asarray(res[key]), np.asarray(ref[key]))
  np.testing.assert_allclose(np.asarray(res['scores']), np.asarray(ref['scores']), atol=1e-6)


def test_prompt_inference_rejects_unknown_level():
  with pytest.raises(ValueError, match='level'):
    prompt_inference(None, None, np.zeros((1, 64, 64, 3)), np.zeros((1, 64, 64)), 'scene')
