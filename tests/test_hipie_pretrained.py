"""HIPIE's text encoder from a Hugging Face BERT directory (`config.text.weights`)."""

import numpy as np
import pytest
from flax import traverse_util

from configs import hipie
from hiseg_jax.hipie import spec
from hiseg_jax.text import load_bert
from tests.test_bert import _minilm_dir

MINILM = {'hidden_size': 384, 'num_hidden_layers': 6, 'num_attention_heads': 12,
          'intermediate_size': 1536, 'vocab_size': 30522, 'max_position_embeddings': 512}


def _config(weights):
  config = hipie.get_config('runlocal')
  config.model.text_encoder.update(MINILM)
  config.text.weights = weights
  return config


def test_no_weights_keeps_the_random_initialisation():
  assert spec.pretrained(_config('')) == {}


def test_minilm_weights_become_the_text_encoder():
  got = spec.pretrained(_config(_minilm_dir()))
  assert set(got) == {'text_encoder'}
  _, want = load_bert(_minilm_dir())
  flat_got = traverse_util.flatten_dict(got['text_encoder'])
  flat_want = traverse_util.flatten_dict(want)
  assert flat_got.keys() == flat_want.keys()
  for k, v in flat_want.items():
    np.testing.assert_array_equal(np.asarray(flat_got[k]), np.asarray(v))


def test_architecture_mismatch_names_the_fields():
  config = _config(_minilm_dir())
  config.model.text_encoder.hidden_size = 64
  config.model.text_encoder.num_attention_heads = 4
  with pytest.raises(ValueError, match='hidden_size: checkpoint 384 vs config 64'):
    spec.pretrained(config)
