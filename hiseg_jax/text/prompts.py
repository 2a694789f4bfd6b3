"""Text prompts for HIPIE: class prompts, positive maps, 512-token chunking, sentences, pooling.

Facts followed (HIPIE reference code, berkeley-hipie/HIPIE):

* Class prompt: cleaned class names joined by ". " with no trailing period,
  e.g. "person. traffic light. cat"; each class owns the tokens covering its
  character span (the reference maps span ends to tokens with
  `char_to_token`; here the fast tokenizer's offset mapping gives the same
  tokens). Cleaning removes a parenthesised part, turns "_" into " " and
  collapses one level of double spaces.
* Prompts longer than 512 tokens are encoded in chunks: in the remaining
  sequence take the last "." (or the final [SEP]) at a position < 510, cut
  after it, replace that token by [SEP], prepend [CLS] to every chunk but the
  first, pad to 512; the chunks' last hidden states are written back to the
  original positions (so a cut "." position holds the hidden state of the
  [SEP] that replaced it). Each chunk therefore has at most 511 real tokens.
  Here only the class separators and the final [SEP] are cut candidates, which
  is the reference rule for class names without "." and keeps every class
  whole in one chunk.
* Per-class scores from token logits: mean (default) or max over the class's
  tokens (`convert_grounding_to_od_logits`); per-class text queries for the
  stuff decoder: mean of the class's token features.
* Referring sentences: tokenised with padding and truncation to a fixed
  length; the sentence feature is the mask-weighted average of all valid token
  features ([CLS] and [SEP] included), or their max (`agg_lang_feat`).
"""

import dataclasses
import re
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers

SEPARATOR = '. '
MAX_LENGTH = 512
CUT_LIMIT = 510


def clean_class_name(name: str) -> str:
  """Cleans a class name as HIPIE does before building prompts.

  Args:
    name: raw class name, e.g. 'tv_monitor (screen)'.

  Returns:
    The name with everything from the first '(' to the last ')' removed, '_'
    replaced by ' ', and each pair of spaces replaced by one space.
  """
  name = re.sub(r'\(.*\)', '', name)
  return name.replace('_', ' ').replace('  ', ' ')


@dataclasses.dataclass(frozen=True)
class PromptChunks:
  """A token sequence split into BERT-sized chunks, and how to put it back.

  Attributes:
    input_ids: [K, L] int32 chunk token ids ([CLS] ... [SEP], then padding).
    attention_mask: [K, L] int32, 1 on real tokens.
    token_index: [T] int32; position t of the original sequence is row
      token_index[t] of the chunks flattened to [K * L].
  """
  input_ids: np.ndarray
  attention_mask: np.ndarray
  token_index: np.ndarray

  @property
  def num_chunks(self) -> int:
    """Number of chunks K."""
    return self.input_ids.shape[0]


def chunk_token_ids(input_ids: np.ndarray,
                    cut_after: np.ndarray,
                    cls_id: int,
                    sep_id: int,
                    pad_id: int = 0,
                    max_length: int = MAX_LENGTH,
                    cut_limit: int = CUT_LIMIT) -> PromptChunks:
  """Splits a tokenised prompt into chunks BERT can encode (HIPIE's rule).

  A sequence of at most `max_length` tokens is one chunk of its own length.
  Longer ones are cut repeatedly after the last candidate position that lies
  less than `cut_limit` tokens into the remaining sequence; the cut token is
  replaced by [SEP], chunks after the first get a leading [CLS], and every
  chunk is padded to `max_length`.

  Args:
    input_ids: [T] int token ids, starting with [CLS] and ending with [SEP].
    cut_after: [T] bool, positions a chunk may end at (the '.' separators and
      the final [SEP]).
    cls_id: id of [CLS].
    sep_id: id of [SEP].
    pad_id: id used for padding.
    max_length: chunk length L for multi-chunk prompts.
    cut_limit: a cut position must be < cut_limit within the remaining tokens.

  Returns:
    The chunks and the index that reassembles per-token values.
  """
  ids = np.asarray(input_ids, np.int32)  # [T]
  cut_after = np.asarray(cut_after, bool)  # [T]
  t = ids.shape[0]
  if ids.ndim != 1 or cut_after.shape != ids.shape:
    raise ValueError(f'chunk_token_ids: input_ids {ids.shape} and cut_after {cut_after.shape} '
                     'must be the same [T]')
  if t < 2 or ids[0] != cls_id or ids[-1] != sep_id:
    raise ValueError('chunk_token_ids: input_ids must start with [CLS] and end with [SEP], '
                     f'got {ids[:3].tolist()} ... {ids[-3:].tolist()}')
  if t <= max_length:
    return PromptChunks(ids[None], np.ones((1, t), np.int32), np.arange(t, dtype=np.int32))
  if not cut_after[-1]:
    raise ValueError('chunk_token_ids: the final [SEP] must be a cut position')
  chunk_ids, chunk_mask = [], []
  token_index = np.zeros(t, np.int32)  # [T]
  start = 0
  while start < t:
    candidates = np.flatnonzero(cut_after[start:start + cut_limit])
    if candidates.size == 0:
      raise ValueError(f'chunk_token_ids: no cut position within {cut_limit} tokens after '
                       f'token {start}; one class name or sentence is too long to chunk')
    end = start + int(candidates[-1]) + 1
    piece = ids[start:end].copy()  # [n]
    piece[-1] = sep_id
    offset = 0 if start == 0 else 1
    if offset:
      piece = np.concatenate([[cls_id], piece]).astype(np.int32)  # [n + 1]
    row = np.full(max_length, pad_id, np.int32)  # [L]
    row[:piece.size] = piece
    mask = np.zeros(max_length, np.int32)  # [L]
    mask[:piece.size] = 1
    k = len(chunk_ids)
    token_index[start:end] = k * max_length + offset + np.arange(end - start)
    chunk_ids.append(row)
    chunk_mask.append(mask)
    start = end
  return PromptChunks(np.stack(chunk_ids), np.stack(chunk_mask), token_index)


def unchunk_tokens(chunk_values: jnp.ndarray, token_index: np.ndarray) -> jnp.ndarray:
  """Writes per-chunk-token values back to the original token positions.

  Args:
    chunk_values: [K, L, ...] values per chunk token (e.g. BERT's last hidden
      state [K, L, H]).
    token_index: [T] from `PromptChunks.token_index`.

  Returns:
    [T, ...] values of the original sequence.
  """
  k, l = chunk_values.shape[:2]
  flat = chunk_values.reshape((k * l,) + chunk_values.shape[2:])  # [K*L, ...]
  return flat[jnp.asarray(token_index)]  # [T, ...]


@dataclasses.dataclass(frozen=True)
class ClassPrompt:
  """A class-list prompt, its tokens, per-class token spans and chunks.

  Attributes:
    class_names: the cleaned names in prompt order (C of them).
    text: the names joined by ". ".
    char_spans: [C, 2] int32 half-open character ranges of the names in `text`.
    input_ids: [T] int32 token ids with [CLS] first and [SEP] last.
    token_spans: [C, 2] int32 half-open token ranges of the names in input_ids.
    chunks: the prompt split for BERT (one chunk when T <= 512).
  """
  class_names: Tuple[str, ...]
  text: str
  char_spans: np.ndarray
  input_ids: np.ndarray
  token_spans: np.ndarray
  chunks: PromptChunks

  @property
  def num_tokens(self) -> int:
    """Number of tokens T."""
    return self.input_ids.shape[0]

  def positive_map(self, length: Optional[int] = None) -> np.ndarray:
    """Class -> token map over the (optionally padded) prompt.

    Args:
      length: token length to pad to (>= T); T when None.

    Returns:
      [C, length] bool, True on each class's tokens.
    """
    length = self.num_tokens if length is None else length
    if length < self.num_tokens:
      raise ValueError(f'positive_map: length {length} < prompt length {self.num_tokens}')
    pm = np.zeros((len(self.class_names), length), bool)  # [C, length]
    for c, (s, e) in enumerate(self.token_spans):
      pm[c, s:e] = True
    return pm

  def padded(self, length: int) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids and attention mask padded to a fixed length.

    Args:
      length: target length (>= T); raises rather than truncating classes away.

    Returns:
      ids [length] int32 (padding id 0) and mask [length] int32.
    """
    if length < self.num_tokens:
      raise ValueError(f'ClassPrompt.padded: prompt of {len(self.class_names)} classes has '
                       f'{self.num_tokens} tokens, more than length {length}')
    ids = np.zeros(length, np.int32)  # [length]
    ids[:self.num_tokens] = self.input_ids
    mask = np.zeros(length, np.int32)  # [length]
    mask[:self.num_tokens] = 1
    return ids, mask

  def chunk_positive_map(self) -> np.ndarray:
    """Class -> token map in each chunk's own coordinates.

    Returns:
      [K, C, L] bool; each class is True in exactly one chunk.
    """
    k, l = self.chunks.input_ids.shape
    flat = np.zeros((len(self.class_names), k * l), bool)  # [C, K*L]
    pm = self.positive_map()  # [C, T]
    flat[:, self.chunks.token_index] = pm
    return flat.reshape(len(self.class_names), k, l).transpose(1, 0, 2)  # [K, C, L]


def build_class_prompt(class_names: Sequence[str],
                       tokenizer: transformers.PreTrainedTokenizerBase,
                       clean: bool = True,
                       max_length: int = MAX_LENGTH,
                       cut_limit: int = CUT_LIMIT) -> ClassPrompt:
  """Joins class names into one prompt and locates every class's tokens.

  Args:
    class_names: C class names (e.g. 'cat', 'traffic light', 'dog head').
    tokenizer: a fast BERT tokenizer (`tokenizer.load_bert_tokenizer`).
    clean: apply `clean_class_name` first, as HIPIE does.
    max_length: BERT's chunk length.
    cut_limit: HIPIE's cut bound (510).

  Returns:
    The prompt with token spans and chunks.
  """
  names = tuple(clean_class_name(n) if clean else n for n in class_names)
  if not names:
    raise ValueError('build_class_prompt: no class names')
  spans, pieces, pos = [], [], 0
  for i, name in enumerate(names):
    if not name.strip():
      raise ValueError(f'build_class_prompt: class {i} ({class_names[i]!r}) is empty '
                       'after cleaning')
    spans.append((pos, pos + len(name)))
    pieces.append(name)
    pos += len(name) + len(SEPARATOR)
  text = SEPARATOR.join(pieces)
  enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
  ids = np.asarray(enc['input_ids'], np.int32)  # [T]
  offsets = np.asarray(enc['offset_mapping'], np.int64)  # [T, 2]
  real = offsets[:, 1] > offsets[:, 0]  # [T]
  token_spans = np.zeros((len(names), 2), np.int32)  # [C, 2]
  for c, (s, e) in enumerate(spans):
    hit = np.flatnonzero(real & (offsets[:, 0] < e) & (offsets[:, 1] > s))
    if hit.size == 0:
      raise ValueError(f'build_class_prompt: class {c} ({names[c]!r}) has no tokens')
    token_spans[c] = (hit[0], hit[-1] + 1)
  cut_after = np.zeros(ids.shape, bool)  # [T]
  cut_after[-1] = True
  for c, (_, e) in enumerate(spans[:-1]):
    dot = np.flatnonzero(real & (offsets[:, 0] == e) & (offsets[:, 1] == e + 1))
    if dot.size != 1:
      raise ValueError(f'build_class_prompt: the "." after class {c} ({names[c]!r}) is '
                       'not a token of its own')
    cut_after[dot[0]] = True
  chunks = chunk_token_ids(ids, cut_after, tokenizer.cls_token_id, tokenizer.sep_token_id,
                           tokenizer.pad_token_id, max_length, cut_limit)
  return ClassPrompt(names, text, np.asarray(spans, np.int32), ids, token_spans, chunks)


def tokenize_sentences(sentences: Sequence[str],
                       tokenizer: transformers.PreTrainedTokenizerBase,
                       max_length: int) -> Tuple[np.ndarray, np.ndarray]:
  """Tokenises referring sentences to a fixed length (padding and truncation).

  Equals `tokenizer(sentences, padding='max_length', truncation=True, max_length=L)` ([CLS],
  the first L-2 tokens, [SEP], then padding), but pads and truncates the plain encoding here:
  asking a fast tokenizer to pad or truncate changes its shared state, and grain builds samples
  in several threads that share one tokenizer.

  Args:
    sentences: N sentences.
    tokenizer: a BERT tokenizer.
    max_length: fixed token length L (HIPIE's MAX_QUERY_LEN), at least 2.

  Returns:
    ids [N, L] int32 and attention mask [N, L] int32.
  """
  if not sentences:
    raise ValueError('tokenize_sentences: no sentences')
  if max_length < 2:
    raise ValueError(f'tokenize_sentences: max_length {max_length} leaves no room for [CLS] and '
                     '[SEP]')
  ids = np.full((len(sentences), max_length), tokenizer.pad_token_id, np.int32)  # [N, L]
  mask = np.zeros((len(sentences), max_length), np.int32)  # [N, L]
  for i, sentence in enumerate(sentences):
    enc = tokenizer(sentence, add_special_tokens=True)['input_ids']
    if len(enc) > max_length:
      enc = enc[:max_length - 1] + [tokenizer.sep_token_id]
    ids[i, :len(enc)] = enc
    mask[i, :len(enc)] = 1
  return ids, mask


def pool_sentence_features(features: jnp.ndarray, attention_mask: jnp.ndarray,
                           mode: str = 'average') -> jnp.ndarray:
  """One feature per sentence from its valid tokens (HIPIE's `agg_lang_feat`).

  Args:
    features: [B, T, H] token features.
    attention_mask: [B, T], 1 on valid tokens (at least one per row).
    mode: 'average' (mask-weighted mean) or 'max'.

  Returns:
    [B, H] sentence features.
  """
  m = attention_mask.astype(features.dtype)[..., None]  # [B, T, 1]
  if mode == 'average':
    return (features * m).sum(1) / m.sum(1)  # [B, H]
  if mode == 'max':
    return jnp.where(m > 0, features, -jnp.inf).max(1)  # [B, H]
  raise ValueError(f'pool_sentence_features: mode {mode!r} is not "average" or "max"')


def sentence_as_first_token(features: jnp.ndarray, attention_mask: jnp.ndarray,
                            grounding: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Per-sample referring mode on a static token axis: a sentence becomes its pooled token 0.

  HIPIE scores a referring batch against one feature, the mean of the sentence's valid tokens
  (`agg_lang_feat`), and a detection batch against every prompt token. For a batch that mixes
  the two, the rows with `grounding` get [pooled, 0, ..., 0] with the mask [1, 0, ..., 0], so a
  token head on them computes exactly the single-token logit at token 0 and masks the rest; the
  other rows are unchanged.

  Args:
    features: [B, T, H] token features.
    attention_mask: [B, T], 1 on valid tokens.
    grounding: bool [B], True for referring samples.

  Returns:
    (features [B, T, H], mask bool [B, T]).
  """
  valid = attention_mask.astype(bool)  # [B, T]
  # A row without valid tokens (evaluation padding) pools over all of them instead of 0 / 0.
  pooled = pool_sentence_features(
      features, jnp.maximum(valid, ~valid.any(-1, keepdims=True)))  # [B, H]
  first = jnp.arange(features.shape[1]) == 0  # [T]
  sentence = jnp.where(first[None, :, None], pooled[:, None, :], 0.0)  # [B, T, H]
  g = grounding.astype(bool)  # [B]
  out = jnp.where(g[:, None, None], sentence.astype(features.dtype), features)  # [B, T, H]
  mask = jnp.where(g[:, None], first[None, :], valid)  # [B, T]
  return out, mask


def _token_class(positive_map: jnp.ndarray) -> jnp.ndarray:
  """Class id of each token (C where none) for a map with disjoint rows."""
  if isinstance(positive_map, np.ndarray) and (np.asarray(positive_map > 0).sum(0) > 1).any():
    raise ValueError('max pooling needs disjoint class spans; a token is in several classes')
  on = positive_map > 0  # [C, T]
  c = positive_map.shape[0]
  return jnp.where(on.any(0), jnp.argmax(on, axis=0), c)  # [T]


def pool_token_logits(logits: jnp.ndarray, positive_map: jnp.ndarray, mode: str = 'mean',
                      empty_value: float = 0.0) -> jnp.ndarray:
  """Per-class scores from per-token logits.

  Args:
    logits: [..., T] token logits (e.g. [B, Q, T]).
    positive_map: [C, T] bool or non-negative weights; row c marks class c's
      tokens (mean uses the row as weights, normalised to sum 1).
    mode: 'mean' (HIPIE's default) or 'max' (needs disjoint rows, as class
      prompts give).
    empty_value: score of a class whose row is empty (e.g. padding classes);
      0 matches the reference, which leaves absent classes at 0.

  Returns:
    [..., C] class scores.
  """
  if positive_map.ndim != 2 or positive_map.shape[1] != logits.shape[-1]:
    raise ValueError(f'pool_token_logits: positive_map {positive_map.shape} does not match '
                     f'logits {logits.shape} on the token axis')
  w = jnp.asarray(positive_map, jnp.float32)  # [C, T]
  count = w.sum(-1)  # [C]
  if mode == 'mean':
    w = w / jnp.maximum(count, 1e-12)[:, None]  # [C, T]
    scores = jnp.einsum('...t,ct->...c', logits.astype(jnp.float32), w)  # [..., C]
  elif mode == 'max':
    c = positive_map.shape[0]
    seg = _token_class(positive_map)  # [T]
    x = jnp.moveaxis(logits.astype(jnp.float32), -1, 0)  # [T, ...]
    scores = jax.ops.segment_max(x, seg, num_segments=c + 1)[:c]  # [C, ...]
    scores = jnp.moveaxis(scores, 0, -1)  # [..., C]
  else:
    raise ValueError(f'pool_token_logits: mode {mode!r} is not "mean" or "max"')
  return jnp.where(count > 0, scores, empty_value)  # [..., C]


def pool_token_features(features: jnp.ndarray, positive_map: jnp.ndarray) -> jnp.ndarray:
  """Per-class features as the mean of each class's token features.

  Args:
    features: [..., T, H] token features.
    positive_map: [C, T] bool or non-negative weights.

  Returns:
    [..., C, H] class features (zeros for an empty row).
  """
  if positive_map.ndim != 2 or positive_map.shape[1] != features.shape[-2]:
    raise ValueError(f'pool_token_features: positive_map {positive_map.shape} does not match '
                     f'features {features.shape} on the token axis')
  w = jnp.asarray(positive_map, jnp.float32)  # [C, T]
  w = w / jnp.maximum(w.sum(-1, keepdims=True), 1e-12)  # [C, T]
  return jnp.einsum('...th,ct->...ch', features.astype(jnp.float32), w)  # [..., C, H]
