"""Tests for hiseg_jax.text.tokenizer.write_word_vocab: a whole-word vocabulary that the BERT
tokenizer built from it (`load_bert_tokenizer`) reads back without [UNK]."""

import numpy as np

from hiseg_jax.text.tokenizer import SPECIAL_TOKENS
from hiseg_jax.text.tokenizer import load_bert_tokenizer
from hiseg_jax.text.tokenizer import read_vocab
from hiseg_jax.text.tokenizer import write_word_vocab

TEXTS = ('Traffic Light', 'tv_monitor (screen)', 'wall-other-merged', 'car:wheel',
         "the man's umbrella, left of the TREE", 'Café  au\tlait', 'door 2', '. ')


def _lines(path):
  with open(path, encoding='utf-8') as f:
    return [line.rstrip('\n') for line in f]


def test_tokenizer_of_written_vocab_knows_every_word(tmp_path):
  path = str(tmp_path / 'text' / 'vocab.txt')
  size = write_word_vocab(path, TEXTS)
  lines = _lines(path)
  assert size == len(lines) == len(read_vocab(path))
  assert tuple(lines[:5]) == SPECIAL_TOKENS and lines[0] == '[PAD]'
  words = lines[5:]
  assert words == sorted(set(words)) and not set(words) & set(SPECIAL_TOKENS)
  assert '.' in words and {'traffic', 'light', 'tv', '_', 'monitor', '(', ')', '-', ':', "'",
                           ',', 'cafe', '2'} <= set(words)
  tok = load_bert_tokenizer(path)
  assert (tok.pad_token_id, tok.unk_token_id) == (0, 1)
  for text in TEXTS:
    ids = tok(text, add_special_tokens=False)['input_ids']
    assert ids and tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))
    # One id per word: no word is split into pieces.
    assert len(ids) == len(tok.backend_tokenizer.pre_tokenizer.pre_tokenize_str(
        tok.backend_tokenizer.normalizer.normalize_str(text))), text
  prompt = tok('traffic light. car. tv monitor')['input_ids']
  assert tok.unk_token_id not in prompt and prompt[0] == tok.cls_token_id
  assert tok.convert_tokens_to_ids('.') in prompt
  unseen = tok('a zebra', add_special_tokens=False)['input_ids']
  np.testing.assert_array_equal(unseen, [tok.unk_token_id] * 2)


def test_separator_only_when_given_and_rewrite_replaces(tmp_path):
  path = str(tmp_path / 'vocab.txt')
  write_word_vocab(path, ['sky', 'grass'])
  assert _lines(path) == list(SPECIAL_TOKENS) + ['grass', 'sky']
  assert write_word_vocab(path, ['road']) == 6
  assert _lines(path) == list(SPECIAL_TOKENS) + ['road']
  assert sorted(p.name for p in tmp_path.iterdir()) == ['vocab.txt']
