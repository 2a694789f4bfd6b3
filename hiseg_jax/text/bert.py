"""Flax BERT encoder with Hugging Face `BertModel` semantics: token ids -> last hidden state.

Post-LN transformer: embeddings (word + absolute position + token type, then
LayerNorm and dropout), then `num_hidden_layers` layers of self-attention (the
padding mask blocks attention to padded keys with the most negative float32
logit, as torch adds `finfo.min`) and a GELU feed-forward block, each followed
by dropout, a residual add and LayerNorm. There is no pooler: HIPIE uses the
last hidden state only (the reference builds BertModel with
`add_pooling_layer=False`).

Parameter tree (converted from torch by `bert_convert`):
`embeddings/{word_embeddings,position_embeddings,token_type_embeddings}/embedding`,
`embeddings/layer_norm`, and per layer `layer_{i}/attention/{q,k,v,out}_proj`,
`layer_{i}/attention_norm`, `layer_{i}/intermediate`, `layer_{i}/output`,
`layer_{i}/output_norm`.
"""

import dataclasses
import json
import os
from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from hiseg_jax.layers.attention import MultiHeadAttention
from hiseg_jax.text.activations import get_activation


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """BERT architecture hyper-parameters (the fields of a Hugging Face config.json).

  Defaults are Hugging Face's BertConfig defaults (bert-base-uncased).

  Attributes:
    vocab_size: number of word-piece ids.
    hidden_size: model width H.
    num_hidden_layers: number of encoder layers.
    num_attention_heads: heads per self-attention (must divide H).
    intermediate_size: feed-forward width.
    hidden_act: feed-forward activation ('gelu' is the exact erf GELU).
    hidden_dropout_prob: dropout after embeddings, attention output and FFN.
    attention_probs_dropout_prob: dropout on attention probabilities.
    max_position_embeddings: longest sequence the position table covers.
    type_vocab_size: number of token-type (segment) ids.
    layer_norm_eps: LayerNorm epsilon.
    initializer_range: std of the normal initialiser for embeddings and Dense
      kernels created from scratch.
  """
  vocab_size: int = 30522
  hidden_size: int = 768
  num_hidden_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  hidden_act: str = 'gelu'
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  initializer_range: float = 0.02

  @classmethod
  def from_json_file(cls, path: str) -> 'BertConfig':
    """Reads a Hugging Face BERT config.json.

    Keys that do not change the encoder's computation (architectures, ids of
    special tokens, versions, ...) are ignored; fields absent from the file take
    Hugging Face's BertConfig defaults.

    Args:
      path: path of config.json.

    Returns:
      The config.
    """
    with open(path, encoding='utf-8') as f:
      raw = json.load(f)
    if raw.get('model_type', 'bert') != 'bert':
      raise ValueError(f'{path}: model_type {raw["model_type"]!r} is not "bert"')
    if raw.get('position_embedding_type', 'absolute') != 'absolute':
      raise ValueError(f'{path}: position_embedding_type '
                       f'{raw["position_embedding_type"]!r} is not supported (only "absolute")')
    if raw.get('is_decoder', False) or raw.get('add_cross_attention', False):
      raise ValueError(f'{path}: decoder / cross-attention BERT configs are not supported')
    names = [f.name for f in dataclasses.fields(cls)]
    config = cls(**{n: raw[n] for n in names if n in raw})
    if config.hidden_size % config.num_attention_heads:
      raise ValueError(f'{path}: hidden_size {config.hidden_size} is not divisible by '
                       f'num_attention_heads {config.num_attention_heads}')
    get_activation(config.hidden_act)
    return config

  @classmethod
  def from_pretrained_dir(cls, directory: str) -> 'BertConfig':
    """Reads `config.json` from a model directory.

    Args:
      directory: Hugging Face model folder.

    Returns:
      The config.
    """
    return cls.from_json_file(os.path.join(directory, 'config.json'))


def _layer_norm(config: BertConfig, dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=config.layer_norm_eps, use_fast_variance=False,
                      dtype=dtype, name=name)


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout.

  Attributes:
    config: the architecture.
    dtype: computation dtype.
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids: jnp.ndarray, token_type_ids: jnp.ndarray,
               deterministic: bool) -> jnp.ndarray:
    """Embeds token ids.

    Args:
      input_ids: [B, T] int word-piece ids.
      token_type_ids: [B, T] int segment ids.
      deterministic: disables dropout when True.

    Returns:
      [B, T, H] embeddings.
    """
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    t = input_ids.shape[1]
    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init,
                    name='word_embeddings')(input_ids)  # [B, T, H]
    pos = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init,
                   name='position_embeddings')(jnp.arange(t))  # [T, H]
    seg = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init,
                   name='token_type_embeddings')(token_type_ids)  # [B, T, H]
    x = word + pos[None] + seg  # [B, T, H]
    x = _layer_norm(cfg, self.dtype, 'layer_norm')(x)  # [B, T, H]
    return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)  # [B, T, H]


class BertLayer(nn.Module):
  """One post-LN encoder layer: self-attention and feed-forward blocks.

  Attributes:
    config: the architecture.
    dtype: computation dtype.
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, attend: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """Applies the layer.

    Args:
      x: [B, T, H] hidden states.
      attend: [B, T, T] bool, True where a query may attend to a key.
      deterministic: disables dropout when True.

    Returns:
      [B, T, H] hidden states.
    """
    cfg = self.config
    init = nn.initializers.normal(cfg.initializer_range)
    dropout = nn.Dropout(cfg.hidden_dropout_prob)
    a = MultiHeadAttention(cfg.num_attention_heads, dropout=cfg.attention_probs_dropout_prob,
                           dtype=self.dtype, name='attention')(
                               x, x, x, mask=attend, deterministic=deterministic)  # [B, T, H]
    a = dropout(a, deterministic=deterministic)  # [B, T, H]
    x = _layer_norm(cfg, self.dtype, 'attention_norm')(x + a)  # [B, T, H]
    h = nn.Dense(cfg.intermediate_size, kernel_init=init, dtype=self.dtype,
                 name='intermediate')(x)  # [B, T, I]
    h = get_activation(cfg.hidden_act)(h)  # [B, T, I]
    h = nn.Dense(cfg.hidden_size, kernel_init=init, dtype=self.dtype, name='output')(h)  # [B, T, H]
    h = dropout(h, deterministic=deterministic)  # [B, T, H]
    return _layer_norm(cfg, self.dtype, 'output_norm')(x + h)  # [B, T, H]


class Bert(nn.Module):
  """BERT encoder returning the last hidden state.

  `Bert(config).apply({'params': params}, input_ids, attention_mask)` equals
  `transformers.BertModel(...)(input_ids, attention_mask).last_hidden_state`
  on converted weights (tests/test_bert.py).

  Attributes:
    config: the architecture.
    dtype: computation dtype (params stay float32; softmax is float32).
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self,
               input_ids: jnp.ndarray,
               attention_mask: Optional[jnp.ndarray] = None,
               token_type_ids: Optional[jnp.ndarray] = None,
               deterministic: bool = True) -> jnp.ndarray:
    """Encodes a batch of token sequences.

    Args:
      input_ids: [B, T] int word-piece ids, T <= max_position_embeddings.
      attention_mask: optional [B, T], 1/True for real tokens and 0/False for
        padding; all ones when omitted.
      token_type_ids: optional [B, T] int segment ids; zeros when omitted.
      deterministic: disables dropout when True (pass a 'dropout' rng otherwise).

    Returns:
      [B, T, H] last hidden state.
    """
    cfg = self.config
    if input_ids.ndim != 2:
      raise ValueError(f'Bert: input_ids must be [B, T], got shape {input_ids.shape}')
    b, t = input_ids.shape
    if t > cfg.max_position_embeddings:
      raise ValueError(f'Bert: sequence length {t} exceeds max_position_embeddings '
                       f'{cfg.max_position_embeddings}; chunk longer prompts '
                       '(hiseg_jax.text.prompts.chunk_token_ids)')
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)  # [B, T]
    if token_type_ids is None:
      token_type_ids = jnp.zeros((b, t), jnp.int32)  # [B, T]
    for name, arr in (('attention_mask', attention_mask), ('token_type_ids', token_type_ids)):
      if arr.shape != (b, t):
        raise ValueError(f'Bert: {name} shape {arr.shape} != input_ids shape {(b, t)}')
    x = BertEmbeddings(cfg, self.dtype, name='embeddings')(
        input_ids, token_type_ids, deterministic)  # [B, T, H]
    attend = jnp.broadcast_to(attention_mask[:, None, :] > 0, (b, t, t))  # [B, T, T]
    for i in range(cfg.num_hidden_layers):
      x = BertLayer(cfg, self.dtype, name=f'layer_{i}')(x, attend, deterministic)  # [B, T, H]
    return x
