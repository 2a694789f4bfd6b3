"""Sigmoid focal losses against PyTorch transcriptions of the HIPIE reference.

Transcribed (our own test code): `token_sigmoid_binary_focal_loss` of HIPIE's
`deformable_detr/segmentation.py` (masked_select on the text mask, sum) and the
point-mask `sigmoid_focal_loss` (`loss.mean(1).sum() / num_boxes`). Tolerance:
rtol 1e-5 / atol 1e-6 (float32), gradients rtol 1e-4.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.losses.focal import sigmoid_focal_loss
from hiseg_jax.losses.focal import token_sigmoid_focal_loss


def t_token_focal(pred_logits, targets, alpha=0.25, gamma=2.0, text_mask=None):
  if text_mask is not None:
    text_mask = (text_mask > 0).unsqueeze(1).repeat(1, pred_logits.size(1), 1)
    pred_logits = torch.masked_select(pred_logits, text_mask)
    targets = torch.masked_select(targets, text_mask)
  p = torch.sigmoid(pred_logits)
  ce_loss = F.binary_cross_entropy_with_logits(pred_logits, targets, reduction='none')
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce_loss * ((1 - p_t) ** gamma)
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss.sum()


def t_point_focal(inputs, targets, num_boxes, alpha=0.25, gamma=2.0):
  prob = inputs.sigmoid()
  ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction='none')
  p_t = prob * targets + (1 - prob) * (1 - targets)
  loss = ce_loss * ((1 - p_t) ** gamma)
  loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return loss.mean(1).sum() / num_boxes


def make_case(seed=0):
  rng = np.random.default_rng(seed)
  logits = (rng.normal(size=(2, 9, 11)) * 4).astype(np.float32)
  logits[0, 0, :3] = [40.0, -40.0, 0.0]  # saturated logits stay finite
  targets = np.zeros((2, 9, 11), np.float32)
  targets[0, 1, 2:4] = 1
  targets[1, 5, 7] = 1
  targets[1, 6, 0:2] = 1
  text_mask = np.ones((2, 11), bool)
  text_mask[0, 8:] = False
  text_mask[1, 5:] = False
  text_mask[1, 7] = True
  return logits, targets, text_mask


@pytest.mark.parametrize('use_mask', [True, False])
def test_token_focal_matches_reference(use_mask):
  logits, targets, text_mask = make_case()
  ref = t_token_focal(torch.from_numpy(logits), torch.from_numpy(targets),
                      text_mask=torch.from_numpy(text_mask) if use_mask else None)
  out = token_sigmoid_focal_loss(jnp.asarray(logits), jnp.asarray(targets),
                                 jnp.asarray(text_mask) if use_mask else None)
  assert out.shape == (2, 9)
  np.testing.assert_allclose(float(out.sum()), float(ref), rtol=1e-5, atol=1e-6)


def test_token_focal_gradient_matches_torch_and_is_finite():
  logits, targets, text_mask = make_case(1)
  tl = torch.from_numpy(logits).requires_grad_(True)
  t_token_focal(tl, torch.from_numpy(targets), text_mask=torch.from_numpy(text_mask)).backward()
  grad = jax.grad(lambda x: token_sigmoid_focal_loss(
      x, jnp.asarray(targets), jnp.asarray(text_mask)).sum())(jnp.asarray(logits))
  assert np.all(np.isfinite(grad))
  np.testing.assert_allclose(grad, tl.grad.numpy(), rtol=1e-4, atol=1e-6)
  assert np.all(np.asarray(grad)[0, :, 8:] == 0.0)  # padded tokens get no gradient


def test_point_focal_matches_reference():
  rng = np.random.default_rng(2)
  logits = (rng.normal(size=(5, 30)) * 3).astype(np.float32)
  labels = rng.uniform(size=(5, 30)).astype(np.float32)  # bilinear targets are soft
  ref = t_point_focal(torch.from_numpy(logits), torch.from_numpy(labels), 3.0)
  out = sigmoid_focal_loss(jnp.asarray(logits), jnp.asarray(labels)).mean(-1).sum() / 3.0
  np.testing.assert_allclose(float(out), float(ref), rtol=1e-5, atol=1e-6)


def test_alpha_and_gamma_are_applied():
  logits = jnp.asarray([[-1.0, 0.5, 2.0]])
  targets = jnp.asarray([[0.0, 1.0, 1.0]])
  plain = sigmoid_focal_loss(logits, targets, alpha=-1, gamma=0.0)
  bce = targets * jax.nn.softplus(-logits) + (1 - targets) * jax.nn.softplus(logits)
  np.testing.assert_allclose(plain, bce, rtol=1e-6)
  weighted = sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=0.0)
  np.testing.assert_allclose(weighted, bce * jnp.asarray([[0.75, 0.25, 0.25]]), rtol=1e-6)


def test_shape_errors():
  with pytest.raises(ValueError, match='token_sigmoid_focal_loss'):
    token_sigmoid_focal_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 5)))
  with pytest.raises(ValueError, match='text_mask'):
    token_sigmoid_focal_loss(jnp.zeros((2, 3, 4)), jnp.zeros((2, 3, 4)), jnp.ones((2, 5)))
  with pytest.raises(ValueError, match='sigmoid_focal_loss'):
    sigmoid_focal_loss(jnp.zeros((3,)), jnp.zeros((4,)))
