"""Flax CLIP against transformers' PyTorch CLIPModel (random small config); MaskCLIP; mask pooling.

The MaskCLIP reference is a transcription, written for this test, of HIPIE's
`MaskCLIP.encode_image_with_mask` / `_mask_clip_forward` (berkeley-hipie/HIPIE,
open_vocab/clip.py) run on the Hugging Face modules with the same weights.
"""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers

from hiseg_jax.text import load_clip
from hiseg_jax.text.clip import CLIP, mask_pool
from hiseg_jax.text.clip_convert import config_from_hf, convert_clip_state_dict

# float32, same weights, 2 layers of width 32: 1e-5 absolute (outputs O(1)).
ATOL = 1e-5

IMAGE, PATCH, BOS, EOS = 32, 8, 97, 98


def _hf_clip(eos_token_id=EOS, seed=0):
  text = dict(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=16, eos_token_id=eos_token_id,
              bos_token_id=BOS, pad_token_id=0)
  vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                image_size=IMAGE, patch_size=PATCH)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=24)
  config._attn_implementation = 'eager'  # pylint: disable=protected-access
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name != 'logit_scale':
        p.add_(0.05 * torch.randn_like(p))
  params = convert_clip_state_dict({k: v.numpy() for k, v in model.state_dict().items()},
                                   config_from_hf(config))
  return model, CLIP(config_from_hf(config)), params


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  pixels = rng.standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)  # NCHW for torch
  ids = rng.integers(1, BOS, (3, 10))
  ids[:, 0] = BOS
  mask = np.ones_like(ids)
  ids[0, 9] = EOS
  ids[1, 5] = EOS
  ids[1, 6:], mask[1, 6:] = 0, 0
  ids[2, 3:] = EOS  # padded with the end-of-text id, as OpenAI's HF tokenizer pads
  mask[2, 4:] = 0
  return pixels, ids, mask


def _nhwc(pixels):
  return jnp.asarray(pixels.transpose(0, 2, 3, 1))


@pytest.mark.parametrize('eos_token_id', [EOS, 2])
def test_image_and_text_features_match_transformers(eos_token_id):
  hf, model, params = _hf_clip(eos_token_id)
  pixels, ids, mask = _inputs()
  with torch.no_grad():
    ref_img = hf.get_image_features(torch.tensor(pixels)).pooler_output.numpy()
    ref_txt = hf.get_text_features(torch.tensor(ids),
                                   attention_mask=torch.tensor(mask)).pooler_output.numpy()
    ref_logits = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                    attention_mask=torch.tensor(mask)).logits_per_image.numpy()
  img = model.apply({'params': params}, _nhwc(pixels), method=CLIP.get_image_features)
  txt = model.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask),
                    method=CLIP.get_text_features)
  np.testing.assert_allclose(np.asarray(img), ref_img, atol=ATOL, rtol=0)
  np.testing.assert_allclose(np.asarray(txt), ref_txt, atol=ATOL, rtol=0)
  logits = model.apply({'params': params}, img, txt, method=CLIP.similarity_logits)
  np.testing.assert_allclose(np.asarray(logits), ref_logits, atol=1e-4, rtol=0)


def test_dense_features_match_transformers_tokens():
  hf, model, params = _hf_clip()
  pixels, _, _ = _inputs(1)
  with torch.no_grad():
    tokens = hf.vision_model(torch.tensor(pixels)).last_hidden_state
    ref = hf.visual_projection(hf.vision_model.post_layernorm(tokens[:, 1:])).numpy()
  dense = model.apply({'params': params}, _nhwc(pixels), method=CLIP.get_dense_image_features)
  g = IMAGE // PATCH
  assert dense.shape == (2, g, g, 24)
  np.testing.assert_allclose(np.asarray(dense).reshape(2, g * g, 24), ref, atol=ATOL, rtol=0)


def _reference_mask_clip(hf, pixels, mask_logits):
  """HIPIE MaskCLIP forward (mask tokens with attention masks) on the HF CLIP modules."""
  vm = hf.vision_model
  b, q = mask_logits.shape[:2]
  patch_mask = F.max_pool2d(mask_logits.sigmoid(), kernel_size=PATCH, stride=PATCH)
  blocked_patches = (patch_mask < 0.5).reshape(b, q, -1)
  n_img_cls = vm.embeddings.num_positions
  n_all = q + n_img_cls
  blocked = torch.zeros((n_all, n_all), dtype=torch.bool)
  blocked[:, :q] = True
  blocked = blocked.unsqueeze(0).repeat_interleave(b, dim=0)
  blocked[:, :q, -(n_img_cls - 1):] = blocked_patches
  # True = blocked; the same mask for every head (added to the logits, as -inf would be).
  additive = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)
  x = vm.pre_layrnorm(vm.embeddings(pixels))
  x = torch.cat([x[:, :1].expand(-1, q, -1), x], dim=1)
  x = vm.encoder(inputs_embeds=x, attention_mask=additive[:, None]).last_hidden_state
  return hf.visual_projection(vm.post_layernorm(x[:, :q]))


def test_mask_embeddings_match_reference_maskclip():
  hf, model, params = _hf_clip()
  pixels, _, _ = _inputs(2)
  rng = np.random.default_rng(3)
  logits = 3.0 * rng.standard_normal((2, 4, IMAGE, IMAGE)).astype(np.float32)
  logits[:, 3] = -5.0  # an empty mask: its token sees only the class token
  with torch.no_grad():
    ref = _reference_mask_clip(hf, torch.tensor(pixels), torch.tensor(logits)).numpy()
  probs = 1.0 / (1.0 + np.exp(-logits))
  out = model.apply({'params': params}, _nhwc(pixels), jnp.asarray(probs),
                    method=CLIP.get_mask_embeddings)
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL, rtol=0)
  full = model.apply({'params': params}, _nhwc(pixels), jnp.ones((2, 2, IMAGE, IMAGE)),
                     method=CLIP.get_mask_embeddings)
  img = model.apply({'params': params}, _nhwc(pixels), method=CLIP.get_image_features)
  np.testing.assert_allclose(np.asarray(full), np.broadcast_to(np.asarray(img)[:, None],
                                                               full.shape), atol=ATOL, rtol=0)
  with pytest.raises(ValueError, match='mask_probs'):
    model.apply({'params': params}, _nhwc(pixels), jnp.ones((2, 2, 16, 16)),
                method=CLIP.get_mask_embeddings)


def test_mask_pool():
  rng = np.random.default_rng(4)
  dense = jnp.asarray(rng.standard_normal((2, 4, 4, 6)).astype(np.float32))
  ones = jnp.ones((2, 3, 32, 32))
  np.testing.assert_allclose(np.asarray(mask_pool(dense, ones)),
                             np.broadcast_to(np.asarray(dense).mean((1, 2))[:, None], (2, 3, 6)),
                             atol=1e-6, rtol=0)
  grid = np.zeros((2, 1, 4, 4), np.float32)
  grid[:, 0, 1:3, 0] = 1.0
  np.testing.assert_allclose(np.asarray(mask_pool(dense, jnp.asarray(grid)))[:, 0],
                             np.asarray(dense)[:, 1:3, 0].mean(1), atol=1e-6, rtol=0)
  assert (np.asarray(mask_pool(dense, jnp.zeros((2, 1, 8, 8)))) == 0).all()


def test_load_clip_from_directory_and_strictness(tmp_path):
  hf, model, params = _hf_clip(seed=1)
  hf.save_pretrained(str(tmp_path))
  loaded_model, loaded = load_clip(str(tmp_path))
  assert loaded_model.config == model.config
  pixels, _, _ = _inputs(5)
  np.testing.assert_allclose(
      np.asarray(loaded_model.apply({'params': loaded}, _nhwc(pixels),
                                    method=CLIP.get_image_features)),
      np.asarray(model.apply({'params': params}, _nhwc(pixels), method=CLIP.get_image_features)),
      atol=0)
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  sd['vision_model.head.weight'] = np.zeros((2, 2), np.float32)
  with pytest.raises(ValueError, match='unexpected .*vision_model.head.weight'):
    convert_clip_state_dict(sd, model.config)
  del sd['vision_model.head.weight'], sd['vision_model.embeddings.class_embedding']
  with pytest.raises(ValueError, match='missing .*class_embedding'):
    convert_clip_state_dict(sd, model.config)
