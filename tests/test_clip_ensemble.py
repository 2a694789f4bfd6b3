"""HIPIE's CLIP ensemble against a PyTorch transcription of the reference.

The reference is a transcription, written for this test, of berkeley-hipie/HIPIE
`HIPIE_IMG.get_clip_logits` (seen / novel split, MUL and ADD aggregation), the CLIP branch of
`HIPIE_IMG.inference` for instances, `MaskCLIP.pred_logits` / `get_mask_embed` and
`open_vocab/helper.py` (`ensemble_logits_with_labels` with "max", `prompt_labels` with "photo").
float32 throughout: 1e-5 absolute on probabilities and logits (logits O(10) after scaling:
1e-4).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hiseg_jax.hipie import clip_ensemble as ce
from hiseg_jax.text.clip import CLIP, CLIPConfig, CLIPTowerConfig

ATOL = 1e-5

TEST_NAMES = ['person,child,girl', 'car,cars', 'giraffe', 'sky', 'zebra,zebras']
TRAIN_NAMES = ['person,people', 'car', 'sky,clouds', 'road']


def _ref_pred_logits(mask_embed, text_embed, labels, logit_scale):
  logits = torch.einsum('bqc,nc->bqn', F.normalize(mask_embed, dim=-1),
                        F.normalize(text_embed, dim=-1)) * torch.clamp(logit_scale.exp(), max=100)
  lens = [len(l) for l in labels]
  out = torch.zeros(*logits.shape[:-1], len(labels))
  for i in range(len(labels)):
    out[..., i] = logits[..., sum(lens[:i]):sum(lens[:i + 1])].max(dim=-1).values
  return out


def _ref_get_clip_logits(pred_open_prob, clip_logits, overlap, alpha, beta, mode):
  if clip_logits.shape[-1] == 1:
    clip_prob = clip_logits.sigmoid()
  else:
    clip_prob = clip_logits.softmax(dim=-1)
  overlap = torch.tensor(overlap, dtype=torch.long)
  if mode == 'ADD':
    base = (pred_open_prob * (1 - alpha) + clip_prob * alpha + 1e-9).log() * overlap
    novel = (pred_open_prob * (1 - beta) + clip_prob * beta + 1e-9).log() * (1 - overlap)
  else:
    base = (pred_open_prob ** (1 - alpha) * clip_prob ** alpha).log() * overlap
    novel = (pred_open_prob ** (1 - beta) * clip_prob ** beta).log() * (1 - overlap)
  return base + novel


def test_prompts_and_seen_classes():
  prompts, owner = ce.clip_prompts(TEST_NAMES)
  assert prompts[:4] == ['a photo of a person.', 'a photo of a child.', 'a photo of a girl.',
                         'a photo of a car.']
  assert owner.tolist() == [0, 0, 0, 1, 1, 2, 3, 4, 4]
  # the reference: a test class is seen when one of its synonyms is a training synonym
  train = {s for n in TRAIN_NAMES for s in n.split(',')}
  want = [not train.isdisjoint(n.split(',')) for n in TEST_NAMES]
  assert ce.seen_classes(TEST_NAMES, TRAIN_NAMES).tolist() == want == [True, True, False, True,
                                                                       False]


def _random_logits(seed, m=7, p=16):
  rng = np.random.default_rng(seed)
  prompts, owner = ce.clip_prompts(TEST_NAMES)
  mask_embed = rng.normal(size=(1, m, p)).astype(np.float32)
  text_embed = rng.normal(size=(len(prompts), p)).astype(np.float32)
  return mask_embed, text_embed, owner


@pytest.mark.parametrize('log_scale', [np.log(100.0) + 0.5, 2.6592])
def test_clip_class_logits_match_reference(log_scale):
  mask_embed, text_embed, owner = _random_logits(0)
  got = ce.clip_class_logits(jnp.asarray(mask_embed), jnp.asarray(text_embed), owner,
                             len(TEST_NAMES), jnp.float32(log_scale))
  labels = [n.split(',') for n in TEST_NAMES]
  want = _ref_pred_logits(torch.from_numpy(mask_embed), torch.from_numpy(text_embed), labels,
                          torch.tensor(log_scale, dtype=torch.float32))
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4)
  with pytest.raises(ValueError, match='every one'):
    ce.clip_class_logits(jnp.asarray(mask_embed), jnp.asarray(text_embed), owner, 6, 1.0)


@pytest.mark.parametrize('mode', ['MUL', 'ADD'])
def test_ensemble_matches_reference_with_seen_and_novel(mode):
  rng = np.random.default_rng(1)
  model_logits = rng.normal(0, 2, (6, 5)).astype(np.float32)
  clip_logits = rng.normal(0, 5, (6, 5)).astype(np.float32)
  seen = ce.seen_classes(TEST_NAMES, TRAIN_NAMES)
  model_probs = F.softmax(torch.from_numpy(model_logits).sigmoid() / 0.06, dim=-1)
  clip_probs = ce.clip_class_probs(jnp.asarray(clip_logits))
  got = ce.ensemble_class_probs(jnp.asarray(model_probs.numpy()), clip_probs, seen, 0.2, 0.45,
                                mode)
  want = _ref_get_clip_logits(model_probs, torch.from_numpy(clip_logits), seen.tolist(), 0.2,
                              0.45, mode).softmax(-1)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=ATOL)
  if mode == 'MUL':  # Eq. 4 directly: p ∝ p_model^(1-w) · p_clip^w, w = α seen / β novel
    w = np.where(seen, 0.2, 0.45)
    direct = model_probs.numpy() ** (1 - w) * np.asarray(clip_probs) ** w
    np.testing.assert_allclose(np.asarray(got), direct / direct.sum(-1, keepdims=True),
                               atol=ATOL)


def test_single_class_uses_sigmoid():
  clip_logits = jnp.array([[0.3], [-1.2]])
  np.testing.assert_allclose(np.asarray(ce.clip_class_probs(clip_logits)),
                             np.asarray(jax.nn.sigmoid(clip_logits)))


def test_instance_scores_match_reference():
  rng = np.random.default_rng(2)
  is_thing = np.array([True, True, True, False, False])
  logits = rng.normal(0, 2, (8, 5)).astype(np.float32)
  logits[:, ~is_thing] = -9999.0
  iou = rng.normal(0, 1, (8,)).astype(np.float32)
  clip_logits = rng.normal(0, 5, (8, 5)).astype(np.float32)
  seen = ce.seen_classes(TEST_NAMES, TRAIN_NAMES)
  got = ce.ensemble_instance_scores(jnp.asarray(logits),
                                    ce.clip_class_probs(jnp.asarray(clip_logits)),
                                    jnp.asarray(iou), is_thing, seen, 0.35, 0.7)
  t_logits = torch.from_numpy(logits)
  is_thing_mask = ~(t_logits[:1] == -9999.0)
  prob_p = F.softmax(t_logits.sigmoid() / 0.06, dim=-1)
  prob = _ref_get_clip_logits(prob_p, torch.from_numpy(clip_logits), seen.tolist(), 0.35, 0.7,
                              'MUL').sigmoid() * is_thing_mask.float()
  want = torch.sqrt(prob ** 0.3 * torch.from_numpy(iou)[:, None].sigmoid() ** 1.7)
  np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=ATOL)
  assert not np.asarray(got)[:, ~is_thing].any()


def test_clip_inputs_match_reference_resizing():
  rng = np.random.default_rng(3)
  image = rng.uniform(0, 255, (21, 30, 3)).astype(np.float32)
  masks = rng.normal(0, 3, (4, 6, 8)).astype(np.float32)
  pixels, probs = ce.clip_inputs(jnp.asarray(image), jnp.asarray(masks), 32)
  t_img = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None] / 255.0, size=(32, 32),
                        mode='bilinear', align_corners=False)
  mean = torch.tensor(ce.CLIP_MEAN).view(1, 3, 1, 1)
  std = torch.tensor(ce.CLIP_STD).view(1, 3, 1, 1)
  want_px = ((t_img - mean) / std).permute(0, 2, 3, 1)
  want_m = F.interpolate(torch.from_numpy(masks)[None], size=(32, 32), mode='bilinear',
                         align_corners=False).sigmoid()
  np.testing.assert_allclose(np.asarray(pixels), want_px.numpy(), atol=1e-4)
  np.testing.assert_allclose(np.asarray(probs), want_m.numpy(), atol=ATOL)


def test_full_mask_embedding_is_the_image_embedding():
  text = CLIPTowerConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=4, vocab_size=99, max_position_embeddings=16,
                         eos_token_id=98)
  vision = CLIPTowerConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                           num_attention_heads=4, image_size=32, patch_size=8)
  model = CLIP(CLIPConfig(text, vision, projection_dim=24))
  ids = jnp.array([[97, 5, 9, 98], [97, 7, 98, 0]])
  params = jax.jit(model.init)(jax.random.PRNGKey(0), ids, jnp.zeros((1, 32, 32, 3)))['params']
  image = jnp.asarray(np.random.default_rng(4).uniform(0, 255, (20, 28, 3)), jnp.float32)
  masks = jnp.stack([jnp.full((5, 7), 20.0), jnp.full((5, 7), -20.0).at[:2, :3].set(20.0)])
  emb = jax.jit(functools.partial(ce.clip_mask_embeddings, model))(params, image, masks)
  pixels, _ = ce.clip_inputs(image, masks, 32)
  whole = jax.jit(functools.partial(model.apply, method=CLIP.get_image_features))(
      {'params': params}, pixels)
  assert emb.shape == (2, 24)
  np.testing.assert_allclose(np.asarray(emb[0]), np.asarray(whole[0]), atol=1e-4)
  assert np.abs(np.asarray(emb[1] - whole[0])).max() > 1e-3
  text_emb = jax.jit(functools.partial(ce.clip_text_embeddings, model))(
      params, ids, (ids > 0).astype(jnp.int32))
  logits = ce.clip_class_logits(emb, text_emb, np.array([0, 1]), 2,
                                params['logit_scale'])
  assert logits.shape == (2, 2) and np.isfinite(np.asarray(logits)).all()
