"""Hugging Face `CLIPModel` weights (safetensors / PyTorch) -> Flax `CLIP` params; `load_clip`.

The Flax parameter tree mirrors the Hugging Face module tree, so names map
mechanically: path parts joined by '.', `layers_{i}` -> `layers.{i}`, leaves
`kernel` / `scale` / `embedding` -> `weight` (Linear kernels transposed, the
patch Conv2d kernel moved to [kh, kw, in, out]), raw parameters
(`class_embedding`, `logit_scale`) keep their names. The only ignored entries
are the two `position_ids` buffers; anything else unused or missing is an
error.
"""

import os
import re
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import transformers

from hiseg_jax.text import state_dict as sd_lib
from hiseg_jax.text.clip import CLIP, CLIPConfig, CLIPTowerConfig

IGNORED_NAMES = ('text_model.embeddings.position_ids', 'vision_model.embeddings.position_ids')

_LEAF_NAMES = {'kernel': 'weight', 'scale': 'weight', 'embedding': 'weight', 'bias': 'bias'}


def torch_name(path: Tuple[str, ...]) -> str:
  """The Hugging Face `CLIPModel` name of a Flax `CLIP` parameter.

  Args:
    path: Flax parameter path, e.g. ('vision_model', 'encoder', 'layers_0',
      'self_attn', 'q_proj', 'kernel').

  Returns:
    The torch name, e.g. 'vision_model.encoder.layers.0.self_attn.q_proj.weight'.
  """
  parts = [re.sub(r'^layers_(\d+)$', r'layers.\1', p) for p in path[:-1]]
  parts.append(_LEAF_NAMES.get(path[-1], path[-1]))
  return '.'.join(parts)


def config_from_hf(hf: transformers.CLIPConfig) -> CLIPConfig:
  """Our CLIP config from a transformers `CLIPConfig`.

  Args:
    hf: the transformers config (defaults and legacy keys resolved by it).

  Returns:
    The equivalent `CLIPConfig`.
  """
  t, v = hf.text_config, hf.vision_config
  eos = t.eos_token_id
  if not isinstance(eos, int):
    raise ValueError(f'CLIP text config: eos_token_id {eos!r} must be one int')
  text = CLIPTowerConfig(
      hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
      hidden_act=t.hidden_act, layer_norm_eps=t.layer_norm_eps, vocab_size=t.vocab_size,
      max_position_embeddings=t.max_position_embeddings, eos_token_id=eos)
  vision = CLIPTowerConfig(
      hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
      num_hidden_layers=v.num_hidden_layers, num_attention_heads=v.num_attention_heads,
      hidden_act=v.hidden_act, layer_norm_eps=v.layer_norm_eps, image_size=v.image_size,
      patch_size=v.patch_size, num_channels=v.num_channels)
  if v.image_size % v.patch_size:
    raise ValueError(f'CLIP vision config: image_size {v.image_size} is not a multiple of '
                     f'patch_size {v.patch_size}')
  return CLIPConfig(text=text, vision=vision, projection_dim=hf.projection_dim,
                    logit_scale_init_value=hf.logit_scale_init_value)


def convert_clip_state_dict(state_dict: Any, config: CLIPConfig,
                            source: str = 'CLIP state dict') -> Any:
  """Converts a Hugging Face `CLIPModel` state dict to `CLIP` params, strictly.

  Args:
    state_dict: {checkpoint name: array} (torch layout).
    config: the architecture the params are for.
    source: what the weights came from, for error messages.

  Returns:
    The Flax params pytree (NumPy float32 arrays).
  """
  v = config.vision
  target = sd_lib.param_shapes(
      CLIP(config), jnp.zeros((1, 1), jnp.int32),
      jnp.zeros((1, v.image_size, v.image_size, v.num_channels), jnp.float32))
  state_dict = {k: np.asarray(x) for k, x in state_dict.items()}
  return sd_lib.convert_state_dict(state_dict, target, torch_name,
                                   lambda n: n in IGNORED_NAMES, source)


def load_clip(path: str, dtype: Any = jnp.float32) -> Tuple[CLIP, Any]:
  """Loads a Hugging Face CLIP model directory as a Flax module and params.

  Args:
    path: directory with config.json and model.safetensors (or
      pytorch_model.bin, read with `torch.load(weights_only=True)`), e.g. a
      copy of openai/clip-vit-large-patch14-336.
    dtype: computation dtype of the returned module.

  Returns:
    (module, params); e.g. `module.apply({'params': params}, pixels,
    method=CLIP.get_image_features)`.
  """
  config_path = os.path.join(path, 'config.json')
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f'load_clip: {config_path} not found')
  config = config_from_hf(transformers.CLIPConfig.from_json_file(config_path))
  params = convert_clip_state_dict(sd_lib.load_state_dict(path), config, source=path)
  return CLIP(config, dtype=dtype), jax.tree.map(jnp.asarray, params)
