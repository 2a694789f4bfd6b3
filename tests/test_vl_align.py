"""Tests for hiseg_jax.hipie.vl_align against a PyTorch transcription of HIPIE's VL_Align."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hiseg_jax.hipie.vl_align import PADDED_TOKEN_LOGIT, VLAlign

# float32, 256/768-wide sums in different orders.
RTOL = 1e-5
ATOL = 2e-5
HIDDEN, LANG = 256, 768


class TorchVLAlign(torch.nn.Module):
  """Transcription of the reference VL_Align (prior 0.01, LOG_SCALE 0, CLAMP_DOT_PRODUCT on)."""

  def __init__(self, lang_dim, hidden_dim):
    super().__init__()
    bias_value = -math.log((1 - 0.01) / 0.01)
    self.dot_product_projection_text = torch.nn.Linear(lang_dim, hidden_dim, bias=True)
    self.log_scale = torch.nn.Parameter(torch.Tensor([0.0]))
    self.bias_lang = torch.nn.Parameter(torch.zeros(lang_dim))
    self.bias0 = torch.nn.Parameter(torch.Tensor([bias_value]))

  def forward(self, x, embedding):
    embedding = torch.nn.functional.normalize(embedding, p=2, dim=-1)
    tokens = self.dot_product_projection_text(embedding / 2.0)
    tokens_bias = torch.matmul(embedding, self.bias_lang) + self.bias0
    bias = tokens_bias.unsqueeze(1).repeat(1, x.shape[1], 1)
    logit = torch.matmul(x, tokens.transpose(-1, -2)) / self.log_scale.exp() + bias
    logit = torch.clamp(logit, max=50000)
    return torch.clamp(logit, min=-50000)


def _reference_and_params(seed, perturb=True):
  torch.manual_seed(seed)
  head = TorchVLAlign(LANG, HIDDEN)
  if perturb:
    with torch.no_grad():
      head.log_scale.fill_(0.3)
      head.bias_lang.normal_()
      head.bias0.add_(0.5)
  t = lambda x: x.detach().numpy()
  params = {
      'dot_product_projection_text': {
          'kernel': t(head.dot_product_projection_text.weight).T,
          'bias': t(head.dot_product_projection_text.bias)},
      'log_scale': t(head.log_scale),
      'bias_lang': t(head.bias_lang),
      'bias0': t(head.bias0),
  }
  return head, {'params': jax.tree.map(jnp.asarray, params)}


def _inputs(seed, b=2, q=9, t=6, scale=1.0):
  rng = np.random.default_rng(seed)
  queries = (scale * rng.normal(size=(b, q, HIDDEN))).astype(np.float32)
  text = rng.normal(size=(b, t, LANG)).astype(np.float32)
  mask = np.ones((b, t), bool)
  mask[0, 4:] = False
  return queries, text, mask


def test_vl_align_matches_torch_reference():
  head, params = _reference_and_params(seed=0)
  queries, text, _ = _inputs(seed=0)
  with torch.no_grad():
    ref = head(torch.from_numpy(queries), torch.from_numpy(text)).numpy()
  out = VLAlign().apply(params, queries, text)
  assert out.shape == ref.shape == (2, 9, 6)
  np.testing.assert_allclose(np.asarray(out), ref, rtol=RTOL, atol=ATOL)


def test_vl_align_clamps_like_reference():
  head, params = _reference_and_params(seed=1)
  queries, text, _ = _inputs(seed=1, scale=2e5)
  with torch.no_grad():
    ref = head(torch.from_numpy(queries), torch.from_numpy(text)).numpy()
  clamped = np.abs(ref) == 50000.0
  assert clamped.any() and not clamped.all()
  out = np.asarray(VLAlign().apply(params, queries, text))
  np.testing.assert_array_equal(out[clamped], ref[clamped])
  # Queries scaled by 2e5: float32 sums of 256 terms of size ~1e5 differ by order
  # 1e-2 between summation orders, so the unclamped entries agree to 0.1 absolute.
  np.testing.assert_allclose(out, ref, rtol=0, atol=0.1)


def test_text_mask_sets_padded_tokens_and_keeps_the_rest():
  head, params = _reference_and_params(seed=2)
  queries, text, mask = _inputs(seed=2)
  with torch.no_grad():
    ref = head(torch.from_numpy(queries), torch.from_numpy(text)).numpy()
  out = np.asarray(VLAlign().apply(params, queries, text, mask))
  valid = np.broadcast_to(mask[:, None, :], out.shape)
  np.testing.assert_allclose(out[valid], ref[valid], rtol=RTOL, atol=ATOL)
  assert np.all(out[~valid] == PADDED_TOKEN_LOGIT)
  # Padded logits vanish from a summed token focal loss: sigmoid is exactly 0 there.
  assert np.all(np.asarray(jax.nn.sigmoid(out[~valid])) == 0.0)


def test_init_matches_reference_defaults():
  queries, text, _ = _inputs(seed=3)
  params = VLAlign().init(jax.random.PRNGKey(0), queries, text)['params']
  np.testing.assert_allclose(np.asarray(params['bias0']), [-math.log(99.0)], rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(params['log_scale']), [0.0])
  np.testing.assert_array_equal(np.asarray(params['bias_lang']), np.zeros(LANG))
  kernel = np.asarray(params['dot_product_projection_text']['kernel'])
  assert kernel.shape == (LANG, HIDDEN)
  assert np.abs(kernel).max() <= 1 / math.sqrt(LANG) and kernel.std() > 0.5 / math.sqrt(3 * LANG)


def test_zero_text_vector_is_finite_like_torch_normalize():
  head, params = _reference_and_params(seed=4)
  queries, text, _ = _inputs(seed=4)
  text[1, 2] = 0.0
  with torch.no_grad():
    ref = head(torch.from_numpy(queries), torch.from_numpy(text)).numpy()
  out = np.asarray(VLAlign().apply(params, queries, text))
  assert np.all(np.isfinite(out))
  np.testing.assert_allclose(out, ref, rtol=RTOL, atol=ATOL)
