"""BERT word-piece tokenizer built from a vocab.txt (transformers' fast `BertTokenizerFast`).

transformers 5.x builds `BertTokenizerFast` from `vocab=` (a dict or a path) and
silently ignores `vocab_file=`; this wrapper reads vocab.txt itself and passes
the {token: id} dict, so a wrong path fails loudly instead of giving a
5-token vocabulary. Lower-casing and accent stripping follow the
tokenizer_config.json next to the vocabulary when there is one (uncased
vocabularies such as bert-base-uncased lower-case), unless given explicitly.
"""

import collections
import json
import os
from typing import Dict, Iterable, Optional

import tokenizers
import transformers

VOCAB_NAME = 'vocab.txt'
TOKENIZER_CONFIG_NAME = 'tokenizer_config.json'


def read_vocab(path: str) -> Dict[str, int]:
  """Reads a word-piece vocabulary, one token a line, id = line number.

  Args:
    path: vocab.txt path.

  Returns:
    Ordered {token: id}.
  """
  with open(path, encoding='utf-8') as f:
    tokens = [line.rstrip('\n') for line in f]
  if not tokens:
    raise ValueError(f'{path}: empty vocabulary')
  vocab = collections.OrderedDict()
  for i, token in enumerate(tokens):
    if token in vocab:
      raise ValueError(f'{path}: token {token!r} appears twice (lines {vocab[token] + 1} '
                       f'and {i + 1})')
    vocab[token] = i
  return vocab


SPECIAL_TOKENS = ('[PAD]', '[UNK]', '[CLS]', '[SEP]', '[MASK]')


def write_word_vocab(path: str, texts: Iterable[str]) -> int:
  """Writes a whole-word vocabulary covering a closed set of texts (e.g. a synthetic dataset).

  Every text is split as `BertTokenizerFast` splits it before word pieces (BERT normaliser with
  lower-casing, then whitespace and punctuation), so the tokenizer built from the file maps each
  word of `texts` to one id and never to [UNK]. Ids: the five BERT special tokens first ([PAD] =
  0), then the words in sorted order.

  Args:
    path: the vocab.txt to write (its directory is created).
    texts: class names, sentences, ...

  Returns:
    The vocabulary size.
  """
  normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  splitter = tokenizers.pre_tokenizers.BertPreTokenizer()
  words = set()
  for text in texts:
    words.update(w for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
  tokens = list(SPECIAL_TOKENS) + sorted(words - set(SPECIAL_TOKENS))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    f.write(''.join(t + '\n' for t in tokens))
  os.replace(tmp, path)
  return len(tokens)


def load_bert_tokenizer(path: str,
                        do_lower_case: Optional[bool] = None,
                        model_max_length: int = 512) -> transformers.BertTokenizerFast:
  """Builds the fast BERT tokenizer from a vocabulary file.

  Args:
    path: vocab.txt, or a directory that holds one.
    do_lower_case: lower-case the input; None reads `do_lower_case` from the
      tokenizer_config.json beside the vocabulary (True when absent).
    model_max_length: longest sequence the tokenizer truncates to when asked.

  Returns:
    A `transformers.BertTokenizerFast` ([CLS] ... [SEP] around each text).
  """
  vocab_path = os.path.join(path, VOCAB_NAME) if os.path.isdir(path) else path
  if not os.path.isfile(vocab_path):
    raise FileNotFoundError(f'load_bert_tokenizer: no vocabulary file at {vocab_path}')
  config_path = os.path.join(os.path.dirname(vocab_path), TOKENIZER_CONFIG_NAME)
  config = {}
  if os.path.isfile(config_path):
    with open(config_path, encoding='utf-8') as f:
      config = json.load(f)
  if do_lower_case is None:
    do_lower_case = bool(config.get('do_lower_case', True))
  vocab = read_vocab(vocab_path)
  for special in SPECIAL_TOKENS:
    if special not in vocab:
      raise ValueError(f'{vocab_path}: special token {special} is missing')
  return transformers.BertTokenizerFast(
      vocab=vocab,
      do_lower_case=do_lower_case,
      strip_accents=config.get('strip_accents'),
      tokenize_chinese_chars=config.get('tokenize_chinese_chars', True),
      model_max_length=model_max_length)
