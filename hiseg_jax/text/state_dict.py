"""Loading Hugging Face PyTorch checkpoints and strict name-by-name conversion to Flax params.

Weights come from `model.safetensors` (read with safetensors' NumPy backend) or,
when only `pytorch_model.bin` exists, from `torch.load(weights_only=True)` (torch
is then needed; it is not a runtime dependency otherwise). Nothing in a
checkpoint executes code.

Conversion is strict, big_vision style: every Flax parameter must find its
checkpoint tensor with the right shape, and every checkpoint tensor must be
used or be on the caller's explicit ignore list; otherwise a ValueError lists
the missing, unexpected and mis-shaped names.
"""

import logging
import os
from typing import Any, Callable, Dict, Mapping, Tuple

import flax
import jax
import numpy as np
import safetensors.numpy

SAFETENSORS_NAME = 'model.safetensors'
TORCH_BIN_NAME = 'pytorch_model.bin'

Path = Tuple[str, ...]


def load_state_dict(directory: str) -> Dict[str, np.ndarray]:
  """Reads the weights of a Hugging Face model directory as NumPy arrays.

  Args:
    directory: folder holding `model.safetensors` or `pytorch_model.bin`.

  Returns:
    {checkpoint name: array} in the checkpoint's dtype.
  """
  st_path = os.path.join(directory, SAFETENSORS_NAME)
  bin_path = os.path.join(directory, TORCH_BIN_NAME)
  if os.path.isfile(st_path):
    return dict(safetensors.numpy.load_file(st_path))
  if os.path.isfile(bin_path):
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError(f'{bin_path}: reading a .bin checkpoint needs torch; convert it '
                        f'to {SAFETENSORS_NAME} or install torch') from e
    state = torch.load(bin_path, map_location='cpu', weights_only=True)
    return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
            for k, v in state.items()}
  raise FileNotFoundError(f'{directory}: neither {SAFETENSORS_NAME} nor {TORCH_BIN_NAME} found')


def torch_to_flax_value(path: Path, value: np.ndarray) -> np.ndarray:
  """Lays a torch tensor out as the Flax leaf named by `path`.

  Linear weights [out, in] become Dense kernels [in, out]; Conv2d weights
  [out, in, kh, kw] become Conv kernels [kh, kw, in, out]; every other leaf
  (biases, LayerNorm scales, embeddings, raw parameters) keeps its layout.

  Args:
    path: Flax parameter path; its last element is the leaf name.
    value: the checkpoint tensor.

  Returns:
    The tensor in Flax layout.
  """
  if path[-1] == 'kernel' and value.ndim == 2:
    return value.T  # [in, out]
  if path[-1] == 'kernel' and value.ndim == 4:
    return value.transpose(2, 3, 1, 0)  # [kh, kw, in, out]
  return value


def convert_state_dict(state_dict: Mapping[str, np.ndarray],
                       target: Any,
                       torch_name: Callable[[Path], str],
                       is_ignored: Callable[[str], bool],
                       source: str) -> Any:
  """Fills a Flax parameter tree from a torch state dict, strictly.

  Args:
    state_dict: {checkpoint name: array}.
    target: the Flax params pytree of arrays or ShapeDtypeStructs (e.g. from
      `jax.eval_shape(module.init, ...)['params']`); gives names, shapes, dtypes.
    torch_name: maps a Flax path to its checkpoint name.
    is_ignored: True for checkpoint names known to be unused (heads, buffers).
    source: what the weights came from, for error messages.

  Returns:
    The params pytree with the checkpoint values (NumPy, target dtypes).
  """
  flat_target = flax.traverse_util.flatten_dict(flax.core.unfreeze(target))
  out, used, missing, mismatched = {}, set(), [], []
  for path, leaf in flat_target.items():
    name = torch_name(path)
    if name not in state_dict:
      missing.append(f'{name} (for {"/".join(path)})')
      continue
    used.add(name)
    value = torch_to_flax_value(path, np.asarray(state_dict[name]))
    if tuple(value.shape) != tuple(leaf.shape):
      mismatched.append(f'{name}: checkpoint {tuple(value.shape)} vs model {tuple(leaf.shape)} '
                        f'(for {"/".join(path)})')
      continue
    out[path] = value.astype(leaf.dtype)
  rest = sorted(set(state_dict) - used)
  ignored = [n for n in rest if is_ignored(n)]
  unexpected = [n for n in rest if not is_ignored(n)]
  if ignored:
    logging.info('%s: ignored known-unused checkpoint entries: %s', source, ignored)
  if missing or unexpected or mismatched:
    raise ValueError(f'{source}: checkpoint does not match the model.\n'
                     f'  missing ({len(missing)}): {missing}\n'
                     f'  unexpected ({len(unexpected)}): {unexpected}\n'
                     f'  shape mismatches ({len(mismatched)}): {mismatched}')
  return flax.traverse_util.unflatten_dict(out)


def param_shapes(module: flax.linen.Module, *init_args: Any) -> Any:
  """Shapes of a module's params without allocating them.

  Args:
    module: the Flax module.
    *init_args: example inputs for `module.init`.

  Returns:
    The params pytree of ShapeDtypeStructs.
  """
  variables = jax.eval_shape(module.init, jax.random.PRNGKey(0), *init_args)
  return variables['params']
