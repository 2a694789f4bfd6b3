"""Hugging Face PyTorch / safetensors BERT weights -> Flax `Bert` params, and `load_bert`.

Accepted checkpoints: `BertModel` state dicts (`embeddings.*`, `encoder.*`) and
`BertFor*` ones whose names carry the `bert.` prefix (e.g. bert-base-uncased),
including the legacy `LayerNorm.gamma` / `LayerNorm.beta` spelling. Only these
entries are known-unused and ignored: the pooler (`pooler.*`), the
pre-training heads (`cls.*`) and the `embeddings.position_ids` buffer. Any
other unused or missing name is an error.
"""

import os
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.text import state_dict as sd_lib
from hiseg_jax.text.bert import Bert, BertConfig

IGNORED_PREFIXES = ('pooler.', 'cls.')
IGNORED_NAMES = ('embeddings.position_ids',)

_EMBEDDING_NAMES = {
    'word_embeddings': 'word_embeddings',
    'position_embeddings': 'position_embeddings',
    'token_type_embeddings': 'token_type_embeddings',
    'layer_norm': 'LayerNorm',
}
_LAYER_NAMES = {
    ('attention', 'q_proj'): 'attention.self.query',
    ('attention', 'k_proj'): 'attention.self.key',
    ('attention', 'v_proj'): 'attention.self.value',
    ('attention', 'out_proj'): 'attention.output.dense',
    ('attention_norm',): 'attention.output.LayerNorm',
    ('intermediate',): 'intermediate.dense',
    ('output',): 'output.dense',
    ('output_norm',): 'output.LayerNorm',
}
_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}


def torch_name(path: Tuple[str, ...]) -> str:
  """The Hugging Face `BertModel` name of a Flax `Bert` parameter.

  Args:
    path: Flax parameter path, e.g. ('layer_3', 'attention', 'q_proj', 'kernel').

  Returns:
    The torch name, e.g. 'encoder.layer.3.attention.self.query.weight'.
  """
  leaf = _LEAF_NAMES[path[-1]]
  if path[0] == 'embeddings':
    return f'embeddings.{_EMBEDDING_NAMES[path[1]]}.{leaf}'
  if path[0].startswith('layer_'):
    index = int(path[0][len('layer_'):])
    return f'encoder.layer.{index}.{_LAYER_NAMES[tuple(path[1:-1])]}.{leaf}'
  raise KeyError(f'unknown BERT parameter path {"/".join(path)}')


def _is_ignored(name: str) -> bool:
  return name in IGNORED_NAMES or name.startswith(IGNORED_PREFIXES)


def normalise_names(state_dict: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Strips the `bert.` prefix of `BertFor*` checkpoints and renames gamma/beta.

  Args:
    state_dict: {checkpoint name: array}.

  Returns:
    {BertModel name: array}; pre-training heads keep their `cls.` names.
  """
  prefixed = any(k.startswith('bert.embeddings.') for k in state_dict)
  out = {}
  for name, value in state_dict.items():
    if prefixed and name.startswith('bert.'):
      name = name[len('bert.'):]
    if name.endswith('LayerNorm.gamma'):
      name = name[:-len('gamma')] + 'weight'
    elif name.endswith('LayerNorm.beta'):
      name = name[:-len('beta')] + 'bias'
    out[name] = value
  return out


def convert_bert_state_dict(state_dict: Mapping[str, np.ndarray], config: BertConfig,
                            source: str = 'BERT state dict') -> Any:
  """Converts a Hugging Face BERT state dict to `Bert` params, strictly.

  Args:
    state_dict: {checkpoint name: array} (torch layout).
    config: the architecture the params are for.
    source: what the weights came from, for error messages.

  Returns:
    The Flax params pytree (NumPy float32 arrays).
  """
  target = sd_lib.param_shapes(Bert(config), jnp.zeros((1, 1), jnp.int32))
  return sd_lib.convert_state_dict(normalise_names(state_dict), target, torch_name,
                                   _is_ignored, source)


def load_bert(path: str, dtype: Any = jnp.float32) -> Tuple[Bert, Any]:
  """Loads a Hugging Face BERT model directory as a Flax module and params.

  Args:
    path: directory with config.json and model.safetensors (or
      pytorch_model.bin, read with `torch.load(weights_only=True)`).
    dtype: computation dtype of the returned module.

  Returns:
    (module, params) such that `module.apply({'params': params}, input_ids,
    attention_mask)` is the [B, T, H] last hidden state.
  """
  if not os.path.isdir(path):
    raise FileNotFoundError(f'load_bert: {path} is not a directory')
  config = BertConfig.from_pretrained_dir(path)
  params = convert_bert_state_dict(sd_lib.load_state_dict(path), config, source=path)
  return Bert(config, dtype=dtype), jax.tree.map(jnp.asarray, params)
