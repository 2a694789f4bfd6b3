"""HIPIE's CLIP ensemble for open-vocabulary classes (paper Eq. 4).

Following berkeley-hipie/HIPIE (`HIPIE_IMG.get_clip_logits`, `open_vocab/clip.py` MaskCLIP):

* Text side: a class name lists synonyms separated by ","; each synonym becomes the prompt
  "a photo of a {synonym}." and is embedded by CLIP's text tower.
* Image side: for each mask, a MaskCLIP embedding (`CLIP.get_mask_embeddings`) of the valid
  image resized bilinearly to CLIP's input size (pixels / 255, CLIP mean / std) with the mask
  logits resized bilinearly to the same size and passed through a sigmoid.
* CLIP class logits: min(exp(logit_scale), 100) · cos(mask embedding, prompt embedding), the
  max over a class's synonyms; CLIP probabilities: softmax over classes (sigmoid when there is a
  single class).
* Ensemble ("MUL", the reference's AGG_MODE for every evaluation):
  log p = log(p_model^(1-α) · p_clip^α) for seen classes and the same with β for novel classes;
  "ADD": log(p_model · (1-α) + p_clip · α + 1e-9). Seen classes are those sharing a synonym
  with the training vocabulary. Semantic / panoptic use softmax(log p) over classes, with
  p_model the panoptic candidates' softmax(sigmoid(logit) / 0.06). Instances use
  p = sigmoid(log p) on thing classes (0 elsewhere) with p_model = softmax(sigmoid(logit) /
  T_fg) (PANO_TEMPERATURE_CLIP_FG, 0.06; plain sigmoid for one class) and score
  sqrt(p^a · sigmoid(iou)^b) with (a, b) = (FG_IOU_A, FG_IOU_B) = (0.3, 1.7).
* Closed-set evaluation does not use the ensemble (the caller skips it).

The reference adds the seen and novel terms after multiplying each by a 0/1 mask, which turns
an underflowed log (-inf · 0) into NaN; here the term is selected per class instead, equal
everywhere else.
"""

from typing import Any, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from hiseg_jax.text.clip import CLIP, LOGIT_SCALE_MAX

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def class_synonyms(class_names: Sequence[str]) -> list:
  """Splits each class name into its comma-separated synonyms.

  Args:
    class_names: C names such as "person,child,girl".

  Returns:
    C lists of synonyms.
  """
  return [name.split(',') for name in class_names]


def clip_prompts(class_names: Sequence[str]) -> Tuple[list, np.ndarray]:
  """CLIP prompts "a photo of a {synonym}." of every synonym of every class.

  Args:
    class_names: C class names with comma-separated synonyms.

  Returns:
    prompts: T strings; prompt_class: int32 [T] class index of each prompt.
  """
  prompts, owner = [], []
  for c, synonyms in enumerate(class_synonyms(class_names)):
    prompts.extend(f'a photo of a {s}.' for s in synonyms)
    owner.extend([c] * len(synonyms))
  return prompts, np.asarray(owner, np.int32)


def seen_classes(test_class_names: Sequence[str],
                 train_class_names: Sequence[str]) -> np.ndarray:
  """Which test classes the model saw in training (a synonym in the training vocabulary).

  Args:
    test_class_names: C test class names with comma-separated synonyms.
    train_class_names: training class names with comma-separated synonyms.

  Returns:
    bool [C].
  """
  train = {s for synonyms in class_synonyms(train_class_names) for s in synonyms}
  return np.array([not train.isdisjoint(s) for s in class_synonyms(test_class_names)], bool)


def clip_class_logits(mask_embeds: jnp.ndarray, text_embeds: jnp.ndarray,
                      prompt_class: np.ndarray, num_classes: int,
                      logit_scale: jnp.ndarray) -> jnp.ndarray:
  """CLIP class logits of masks: scaled cosine similarity, max over each class's prompts.

  Args:
    mask_embeds: [..., M, P] mask embeddings (not normalised).
    text_embeds: [T, P] prompt embeddings (not normalised).
    prompt_class: int [T] class of each prompt (every class needs at least one).
    num_classes: C.
    logit_scale: CLIP's log logit scale (the `logit_scale` parameter).

  Returns:
    [..., M, C] logits.
  """
  prompt_class = np.asarray(prompt_class)
  if prompt_class.shape != (text_embeds.shape[0],):
    raise ValueError(f'clip_class_logits: prompt_class {prompt_class.shape} does not match '
                     f'text_embeds {text_embeds.shape}')
  if set(prompt_class.tolist()) != set(range(num_classes)):
    raise ValueError(f'clip_class_logits: prompt_class must give every one of the {num_classes} '
                     f'classes at least one prompt')
  m = mask_embeds / jnp.linalg.norm(mask_embeds, axis=-1, keepdims=True)  # [..., M, P]
  t = text_embeds / jnp.linalg.norm(text_embeds, axis=-1, keepdims=True)  # [T, P]
  scale = jnp.minimum(jnp.exp(logit_scale), LOGIT_SCALE_MAX)  # []
  logits = scale * jnp.einsum('...mp,tp->...mt', m, t)  # [..., M, T]
  per_class = jax.ops.segment_max(jnp.moveaxis(logits, -1, 0), jnp.asarray(prompt_class),
                                  num_segments=num_classes)  # [C, ..., M]
  return jnp.moveaxis(per_class, 0, -1)  # [..., M, C]


def clip_class_probs(clip_logits: jnp.ndarray) -> jnp.ndarray:
  """CLIP class probabilities: softmax over classes, sigmoid for a single class.

  Args:
    clip_logits: [..., C] CLIP class logits.

  Returns:
    [..., C] probabilities.
  """
  if clip_logits.shape[-1] == 1:
    return jax.nn.sigmoid(clip_logits)
  return jax.nn.softmax(clip_logits, axis=-1)  # [..., C]


def ensemble_log_probs(model_probs: jnp.ndarray, clip_probs: jnp.ndarray, seen: np.ndarray,
                       alpha: float, beta: float, mode: str = 'MUL') -> jnp.ndarray:
  """Eq. 4 in log space: log(p_model^(1-w) · p_clip^w), w = α on seen and β on novel classes.

  Args:
    model_probs: [..., C] model class probabilities.
    clip_probs: [..., C] CLIP class probabilities.
    seen: bool [C] classes of the training vocabulary.
    alpha: CLIP weight on seen classes.
    beta: CLIP weight on novel classes.
    mode: 'MUL' (geometric, Eq. 4) or 'ADD' (log of the arithmetic mix + 1e-9).

  Returns:
    [..., C] combined log-probabilities (unnormalised).
  """
  seen = jnp.asarray(seen, bool)
  if seen.shape != model_probs.shape[-1:] or clip_probs.shape != model_probs.shape:
    raise ValueError(f'ensemble_log_probs: model {model_probs.shape}, clip {clip_probs.shape} '
                     f'and seen {seen.shape} disagree')
  p1, p2 = model_probs.astype(jnp.float32), clip_probs.astype(jnp.float32)  # [..., C]

  def combine(w):
    if mode == 'MUL':
      return jnp.log(p1 ** (1.0 - w) * p2 ** w)  # [..., C]
    if mode == 'ADD':
      return jnp.log(p1 * (1.0 - w) + p2 * w + 1e-9)  # [..., C]
    raise ValueError(f'ensemble_log_probs: mode {mode!r} is not "MUL" or "ADD"')

  return jnp.where(seen, combine(alpha), combine(beta))  # [..., C]


def ensemble_class_probs(model_probs: jnp.ndarray, clip_probs: jnp.ndarray, seen: np.ndarray,
                         alpha: float, beta: float, mode: str = 'MUL') -> jnp.ndarray:
  """Normalised Eq. 4 (semantic / panoptic candidates).

  Args:
    model_probs: [N, C] candidate probabilities (`panoptic.candidate_class_probs`).
    clip_probs: [N, C] CLIP probabilities of the candidates' masks.
    seen: bool [C].
    alpha: CLIP weight on seen classes.
    beta: CLIP weight on novel classes.
    mode: 'MUL' or 'ADD'.

  Returns:
    [N, C] probabilities summing to 1 over classes.
  """
  return jax.nn.softmax(ensemble_log_probs(model_probs, clip_probs, seen, alpha, beta, mode),
                        axis=-1)  # [N, C]


def ensemble_instance_scores(class_logits: jnp.ndarray, clip_probs: jnp.ndarray,
                             iou_logits: Optional[jnp.ndarray], allowed: np.ndarray,
                             seen: np.ndarray, alpha: float, beta: float,
                             temperature: Optional[float] = 0.06,
                             iou_exponents: Tuple[float, float] = (0.3, 1.7),
                             mode: str = 'MUL') -> jnp.ndarray:
  """Instance scores with the CLIP ensemble (replaces `instances.instance_scores`).

  Args:
    class_logits: [Q, C] restricted thing logits (`instances.thing_class_logits`).
    clip_probs: [Q, C] CLIP probabilities of the queries' masks.
    iou_logits: [Q] IoU-head logits, or None.
    allowed: bool [C] classes left unmasked in `class_logits` (thing classes).
    seen: bool [C].
    alpha: CLIP weight on seen classes.
    beta: CLIP weight on novel classes.
    temperature: PANO_TEMPERATURE_CLIP_FG for the model probabilities (None: sigmoid).
    iou_exponents: (FG_IOU_A, FG_IOU_B).
    mode: 'MUL' or 'ADD'.

  Returns:
    [Q, C] scores for `instances.select_instances`.
  """
  prob = jax.nn.sigmoid(class_logits.astype(jnp.float32))  # [Q, C]
  if temperature is not None and class_logits.shape[-1] > 1:
    prob = jax.nn.softmax(prob / temperature, axis=-1)  # [Q, C]
  log_p = ensemble_log_probs(prob, clip_probs, seen, alpha, beta, mode)  # [Q, C]
  p = jax.nn.sigmoid(log_p) * jnp.asarray(allowed, jnp.float32)  # [Q, C]
  if iou_logits is None:
    return p
  a, b = iou_exponents
  iou = jax.nn.sigmoid(iou_logits.astype(jnp.float32).reshape(-1, 1))  # [Q, 1]
  return jnp.sqrt(p ** a * iou ** b)  # [Q, C]


def clip_inputs(image: jnp.ndarray, mask_logits: jnp.ndarray,
                image_size: int) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """CLIP pixel values and mask probabilities of one image's masks.

  Args:
    image: [H, W, 3] RGB in [0, 255], the valid (unpadded) image.
    mask_logits: [M, h, w] mask logits covering the same area as `image`.
    image_size: CLIP's input side S.

  Returns:
    pixel_values [1, S, S, 3] normalised; mask_probs [1, M, S, S].
  """
  if image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f'clip_inputs: image must be [H, W, 3], got {image.shape}')
  if mask_logits.ndim != 3:
    raise ValueError(f'clip_inputs: mask_logits must be [M, h, w], got {mask_logits.shape}')
  s, m = image_size, mask_logits.shape[0]
  pixels = jax.image.resize(image.astype(jnp.float32) / 255.0, (s, s, 3), 'bilinear',
                            antialias=False)  # [S, S, 3]
  pixels = (pixels - jnp.array(CLIP_MEAN)) / jnp.array(CLIP_STD)  # [S, S, 3]
  masks = jax.image.resize(mask_logits.astype(jnp.float32), (m, s, s), 'bilinear',
                           antialias=False)  # [M, S, S]
  return pixels[None], jax.nn.sigmoid(masks)[None]  # [1, S, S, 3], [1, M, S, S]


def clip_mask_embeddings(model: CLIP, params: Any, image: jnp.ndarray,
                         mask_logits: jnp.ndarray) -> jnp.ndarray:
  """MaskCLIP embeddings of one image's masks (HIPIE's mask-pooled CLIP features).

  Args:
    model: the Flax CLIP.
    params: its parameters.
    image: [H, W, 3] RGB in [0, 255], the valid image.
    mask_logits: [M, h, w] mask logits covering the same area.

  Returns:
    [M, P] mask embeddings (not normalised).
  """
  pixels, masks = clip_inputs(image, mask_logits, model.config.vision.image_size)
  return model.apply({'params': params}, pixels, masks,
                     method=CLIP.get_mask_embeddings)[0]  # [M, P]


def clip_text_embeddings(model: CLIP, params: Any, input_ids: jnp.ndarray,
                         attention_mask: Optional[jnp.ndarray] = None) -> jnp.ndarray:
  """CLIP embeddings of tokenised prompts (from `clip_prompts`).

  Args:
    model: the Flax CLIP.
    params: its parameters.
    input_ids: [T, L] CLIP token ids.
    attention_mask: optional [T, L].

  Returns:
    [T, P] prompt embeddings (not normalised).
  """
  return model.apply({'params': params}, input_ids, attention_mask,
                     method=CLIP.get_text_features)  # [T, P]
