"""The AIMS set criterion: Eq. 4 per level and decoder block, plus Eq. 8.

For each level L in (part, entity, relation) and each decoder prediction (the
auxiliary per-block outputs and the final one), the predictions are matched to
the level's padded ground truth with the configured matcher on the
Mask2Former cost (`hiseg_jax.matching.costs.mask_matching_cost`), then

* objectness BCE (`objectness_loss`): matched queries target 1, the others 0
  with weight `no_object_weight`;
* mask BCE and dice on importance-sampled points (`sampled_mask_losses`), or
  with `num_points` = 0 on every cell of the prediction grid
  (`dense_mask_losses`), summed over the matched ground truths and divided by
  `num_masks_L`, the number of valid ground truths of level L in supervised
  samples over the whole (global) batch, clamped >= 1 (Mask2Former's
  normaliser; it equals the number of matched ground truths whenever Q >= N_L).
  Under jit with sharded arrays the sum is over the global batch, so no
  collective is needed.

Which samples supervise a level: `task_supervision` maps each AIMS sample type
to (the one level decoder it trains, the level of that decoder's targets)
(Table 6: 1/4 entity, 2/5/7 part, 3/6 relation, each with its own level's
targets; 8 the relation decoder with the two prompted *entities* as targets);
the other two decoders contribute no loss for that sample. For a decoder whose
samples draw targets from another level (type 8), the ground truth of those
samples is taken from that level, both padded to the larger slot count. A sample
whose supervised region is empty contributes nothing. Task ids missing from the
mapping supervise no level (the data layer validates task ids).

Supervised region: `prompt/region` [B, H, W] (times `valid` [B, H, W] when the
batch has it, so padding is never supervised). Matching and loss points are
drawn uniformly inside it, so mask pixels outside it never count; the dense
terms (`match_num_points` / `num_points` = 0) weight each prediction cell by
the fraction of its pixels inside it (`hiseg_jax.losses.grid_targets`).

Association (Eq. 8, `association_loss`): uses the final-block matches of both
levels. Matching is a pure assignment, so it is computed for every level from
`L/valid` alone, also in samples that do not supervise that level; this is
required because each sample type trains one decoder only, and it is what lets
`assoc/ep_valid` (`assoc/re_valid`) samples, whose annotations cover both
levels, supervise the similarity of matched query pairs. Samples whose decoder
was matched against another level's targets (type 8) have no matches of their
own level and add no association pairs. The term is skipped
when the model has no association module (`outputs` lacks `assoc_ep` /
`assoc_re`).

Static sample layout (`sample_tasks`): the AIMS mixture fixes the sample type of every batch
position, so the positions that supervise a level are known when the step is traced. The
auxiliary predictions are then matched and scored on those positions only, and the final one is
matched on the whole batch (for the association loss) and scored on them. Other positions
contribute nothing to a level's loss anyway, so the losses are those of the unrestricted
criterion up to the random points, computed on a quarter to three eighths of the samples (the
point sampling and its top-k dominate the runlocal loss).

Randomness (documented so tests can re-derive the points):
`level_keys = jax.random.split(rng, 3)` in the order part, entity, relation;
`block_keys = jax.random.split(level_key, num_blocks)` over the blocks in the
order `aux[0], ..., aux[-1], final`; `match_key, loss_key =
jax.random.split(block_key)` feed `mask_matching_cost` and
`sampled_mask_losses`, drawn for the samples each one sees (the level's positions, or the whole
batch for the final matching and without `sample_tasks`).

The auxiliary blocks of a level are stacked (`[K-1, B, Q, h, w]`, one extra copy of the
predicted masks) and processed by `jax.lax.map` in groups of `block_batch`
blocks (vectorised within a group, one group after the other), so compile time
does not grow with the number of decoder blocks; `block_batch` = 1 keeps the
point-sampling buffers of only one block live (large images), `block_batch` >=
K-1 runs every auxiliary block at once in fewer, larger operations and one host matching
call per level (about 5% faster per runlocal training step on a 2-core CPU).
The result does not depend on `block_batch`. All predictions of a level must
share shapes.
"""

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import aims_mixture
from hiseg_jax.losses.association_loss import association_loss
from hiseg_jax.losses.loss_config import check_loss_config
from hiseg_jax.losses.mask_losses import dense_mask_losses
from hiseg_jax.losses.mask_losses import sampled_mask_losses
from hiseg_jax.losses.objectness_loss import objectness_loss
from hiseg_jax.matching import get_matcher
from hiseg_jax.matching.costs import mask_matching_cost
from hiseg_jax.matching.hungarian import matched_queries

LEVELS = ("part", "entity", "relation")

# AIMS Table 6: sample type -> (the level decoder it supervises, the level of its targets).
# Type 8 ("two entities") supervises the relation decoder with the two entities' masks.
AIMS_TASK_SUPERVISION = {t.id: (t.decoder, t.target_level) for t in aims_mixture.SAMPLE_TYPES}

# (output key, ground-truth key, validity key, higher level, lower level).
ASSOCIATIONS = (
    ("assoc_ep", "assoc/ep", "assoc/ep_valid", "entity", "part"),
    ("assoc_re", "assoc/re", "assoc/re_valid", "relation", "entity"),
)

_CONFIG_TYPES = {
    "class_weight": (int, float),
    "mask_weight": (int, float),
    "dice_weight": (int, float),
    "no_object_weight": (int, float),
    "assoc_weight": (int, float),
    "num_points": (int,),
    "match_num_points": (int,),
    "oversample_ratio": (int, float),
    "importance_sample_ratio": (int, float),
    "matcher": (str,),
    "block_batch": (int,),
}


def default_aims_loss_config() -> Dict[str, Any]:
  """Returns the AIMS loss settings (Mask2Former/CropFormer defaults).

  Returns:
    Dict with `class_weight` 2, `mask_weight` 5, `dice_weight` 5,
    `no_object_weight` 0.1, `assoc_weight` 1, `num_points` 12544 (loss points
    per mask), `match_num_points` 12544 (matching points per image),
    `oversample_ratio` 3, `importance_sample_ratio` 0.75, `matcher`
    "hungarian_host" and `block_batch` 1 (decoder blocks matched and scored
    together, see the module docstring). `num_points` = 0 (`match_num_points`
    = 0) replaces the sampled points of the losses (of the matching costs) by
    every cell of the prediction grid; the sampling ratios then play no part.
  """
  return {
      "class_weight": 2.0,
      "mask_weight": 5.0,
      "dice_weight": 5.0,
      "no_object_weight": 0.1,
      "assoc_weight": 1.0,
      "num_points": 12544,
      "match_num_points": 12544,
      "oversample_ratio": 3.0,
      "importance_sample_ratio": 0.75,
      "matcher": "hungarian_host",
      "block_batch": 1,
  }


def check_aims_loss_config(config: Mapping[str, Any]) -> Dict[str, Any]:
  """Validates a loss config (dict or ConfigDict) and returns a plain dict.

  Args:
    config: mapping with exactly the keys of `default_aims_loss_config()`.

  Returns:
    The settings as a dict.

  Raises:
    ValueError: on missing or unknown keys, wrong types or bad values.
  """
  return check_loss_config("AIMS loss config", config, _CONFIG_TYPES,
                           dense_keys=("num_points", "match_num_points"))


def _check_level_outputs(level: str, block: Mapping[str, Any], where: str,
                         batch_size: int) -> None:
  """Raises when one level prediction is not `logits [B, Q]` + `masks [B, Q, h, w]`."""
  if "logits" not in block or "masks" not in block:
    raise ValueError(f"aims_set_criterion: outputs[{level!r}]{where} needs 'logits' and "
                     f"'masks'; got keys {sorted(block)}")
  logits, masks = block["logits"], block["masks"]
  if logits.ndim != 2 or masks.ndim != 4 or masks.shape[:2] != logits.shape \
      or logits.shape[0] != batch_size:
    raise ValueError(
        f"aims_set_criterion: outputs[{level!r}]{where} must hold logits [B, Q] and masks "
        f"[B, Q, h, w] with B={batch_size}; got {logits.shape} and {masks.shape}")


def _supervised_region(batch: Mapping[str, jax.Array]) -> jax.Array:
  """Returns `prompt/region` restricted to the image area `valid`, `[B, H, W]`."""
  region = batch["prompt/region"].astype(jnp.float32)  # [B, H, W]
  if region.ndim != 3:
    raise ValueError(f"aims_set_criterion: batch['prompt/region'] must be [B, H, W], "
                     f"got {region.shape}")
  if "valid" in batch:
    if batch["valid"].shape != region.shape:
      raise ValueError(f"aims_set_criterion: batch['valid'] {batch['valid'].shape} and "
                       f"batch['prompt/region'] {region.shape} must have equal shapes")
    region = region * (batch["valid"] > 0.5)  # [B, H, W]
  return region


def _match(
    block_key: jax.Array,
    logits: jax.Array,
    masks: jax.Array,
    gt_masks: jax.Array,
    gt_valid: jax.Array,
    region: jax.Array,
    cfg: Mapping[str, Any],
    matcher: Callable[[jax.Array, jax.Array], Tuple[jax.Array, jax.Array]],
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Matches one decoder prediction of a level.

  Returns:
    (the block's loss key, pred_idx int32 [B, N], matched bool [B, N]).
  """
  match_key, loss_key = jax.random.split(block_key)
  cost = mask_matching_cost(
      match_key, logits, masks, gt_masks, cfg["match_num_points"], cfg["class_weight"],
      cfg["mask_weight"], cfg["dice_weight"], region=region)  # [B, Q, N]
  pred_idx, matched = matcher(cost, gt_valid)  # [B, N], [B, N]
  return loss_key, pred_idx, matched


def _matched_losses(
    loss_key: jax.Array,
    logits: jax.Array,
    masks: jax.Array,
    pred_idx: jax.Array,
    matched: jax.Array,
    *,
    gt_masks: jax.Array,
    active: jax.Array,
    num_masks: jax.Array,
    region: jax.Array,
    cfg: Mapping[str, Any],
) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """Objectness, mask BCE and dice losses of one matched decoder prediction."""
  loss_obj = objectness_loss(
      logits, matched_queries(pred_idx, matched, logits.shape[1]), active,
      cfg["no_object_weight"])
  aligned = jnp.take_along_axis(masks, pred_idx[:, :, None, None], axis=1)  # [B, N, h, w]
  if cfg["num_points"] == 0:
    ce, dice = dense_mask_losses(aligned, gt_masks, region=region)  # [B, N], [B, N]
  else:
    ce, dice = sampled_mask_losses(
        loss_key, aligned, gt_masks, cfg["num_points"], cfg["oversample_ratio"],
        cfg["importance_sample_ratio"], region=region)  # [B, N], [B, N]
  keep = matched & active[:, None]  # [B, N]
  loss_mask = jnp.where(keep, ce, 0.0).sum() / num_masks
  loss_dice = jnp.where(keep, dice, 0.0).sum() / num_masks
  return loss_obj, loss_mask, loss_dice


def _decoder_targets(batch: Mapping[str, jax.Array], decoder: str, task: jax.Array,
                     task_supervision: Mapping[int, Tuple[str, str]]
                     ) -> Tuple[jax.Array, jax.Array, jax.Array]:
  """The ground truth each sample's `decoder` predictions are matched against.

  Samples of a type that supervises `decoder` with another level's targets (AIMS type 8:
  relation decoder, entity targets) take that level's masks; all others take the decoder's own.

  Args:
    batch: the data-contract batch.
    decoder: the level decoder.
    task: int [B] sample types.
    task_supervision: sample type -> (decoder, target level).

  Returns:
    (masks [B, N, h, w], valid bool [B, N], swapped bool [B]) with N the largest slot count of
    the levels involved; `swapped` marks samples whose targets come from another level.
  """
  others = sorted({t for d, t in task_supervision.values() if d == decoder and t != decoder})
  n = max(batch[f"{lv}/valid"].shape[1] for lv in [decoder] + others)

  def padded(level):
    masks = batch[f"{level}/masks"]  # [B, N_l, h, w]
    valid = batch[f"{level}/valid"].astype(jnp.bool_)  # [B, N_l]
    extra = n - valid.shape[1]
    return (jnp.pad(masks, ((0, 0), (0, extra), (0, 0), (0, 0))),
            jnp.pad(valid, ((0, 0), (0, extra))))  # [B, N, h, w], [B, N]

  masks, valid = padded(decoder)
  swapped = jnp.zeros(task.shape, jnp.bool_)  # [B]
  for level in others:
    tasks = jnp.asarray([t for t, (d, tl) in task_supervision.items()
                         if d == decoder and tl == level], jnp.int32)  # [T]
    sel = (task[:, None] == tasks[None, :]).any(axis=1)  # [B]
    level_masks, level_valid = padded(level)
    masks = jnp.where(sel[:, None, None, None], level_masks.astype(masks.dtype), masks)
    valid = jnp.where(sel[:, None], level_valid, valid)
    swapped = swapped | sel
  return masks, valid, swapped


def aims_set_criterion(
    outputs: Mapping[str, Any],
    batch: Mapping[str, jax.Array],
    rng: jax.Array,
    config: Mapping[str, Any],
    task_supervision: Mapping[int, Tuple[str, str]] = AIMS_TASK_SUPERVISION,
    sample_tasks: Optional[Sequence[int]] = None,
) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """AIMS training loss (Eq. 9 = Eq. 4 over levels and blocks + Eq. 8).

  Args:
    outputs: model outputs; for each level in `LEVELS` a dict with `logits`
      `[B, Q]`, `masks` `[B, Q, h, w]` (the mask-feature stride, 4 or 2) and `aux`, a list of such
      dicts for the earlier decoder predictions (may be empty); optionally
      `assoc_ep` `[B, Q_e, Q_p]` and `assoc_re` `[B, Q_r, Q_e]` similarity logits.
    batch: data-contract batch: `L/masks` `[B, N_L, H/k, W/k]` (any target
      stride k, e.g. 4 or 1; read at normalised points), `L/valid`
      `[B, N_L]` for each level, `assoc/ep` `[B, N_e, N_p]`, `assoc/re`
      `[B, N_r, N_e]`, `assoc/ep_valid` `[B]`, `assoc/re_valid` `[B]`,
      `prompt/region` `[B, H, W]`, optional `valid` `[B, H, W]`, `task` `[B]`.
    rng: PRNG key for matching and loss points (split as the module says).
    config: loss settings, see `default_aims_loss_config`.
    task_supervision: sample type -> (supervised decoder, level of its targets)
      (the data layer's Table 6).
    sample_tasks: the sample type of every batch position when it is fixed by the batch layout
      (the AIMS mixture puts type `sample_types[g % K]` at global position g, so with a batch
      size divisible by K every batch has the same layout); the losses of a level are then
      computed on the positions of its sample types only. None: every position is scored and
      `task` alone decides which ones count.

  Returns:
    `(total, terms)`: the weighted total and unweighted scalar terms
    `L/loss_obj`, `L/loss_mask`, `L/loss_dice` (final prediction),
    `L/loss_aux` (weighted sum over the auxiliary predictions) per level and
    `assoc/loss_ep`, `assoc/loss_re` when the model predicts associations; with
    `sample_tasks`, also `L/off_layout`: the supervising samples of level L found at a position
    the layout gives another type (they are not scored, so it must stay 0).

  Raises:
    ValueError: on a bad config, unknown levels in `task_supervision`, or missing
      / mis-shaped outputs or batch entries.
  """
  cfg = check_aims_loss_config(config)
  bad_levels = sorted({lv for pair in task_supervision.values() for lv in pair} - set(LEVELS))
  if bad_levels:
    raise ValueError(f"aims_set_criterion: task_supervision names unknown levels {bad_levels}; "
                     f"levels are {LEVELS}")
  matcher = get_matcher(cfg["matcher"])
  required = ["task", "prompt/region"] + [f"{level}/{field}" for level in LEVELS
                                          for field in ("masks", "valid")]
  required += [key for out_key, gt_key, valid_key, _, _ in ASSOCIATIONS if out_key in outputs
               for key in (gt_key, valid_key)]
  missing = [key for key in required if key not in batch]
  if missing:
    raise ValueError(f"aims_set_criterion: batch lacks {missing}; it has {sorted(batch)}")
  region = _supervised_region(batch)  # [B, H, W]
  batch_size = region.shape[0]
  region_any = (region > 0.5).any(axis=(1, 2))  # [B]
  task = batch["task"]  # [B]
  if task.shape != (batch_size,):
    raise ValueError(f"aims_set_criterion: batch['task'] must be [{batch_size}], got {task.shape}")
  if sample_tasks is not None and len(sample_tasks) != batch_size:
    raise ValueError(f"aims_set_criterion: sample_tasks has {len(sample_tasks)} entries for a "
                     f"batch of {batch_size}")

  total = jnp.zeros((), jnp.float32)
  terms = {}
  final_matches = {}
  for level, level_key in zip(LEVELS, jax.random.split(rng, len(LEVELS))):
    if level not in outputs:
      raise ValueError(f"aims_set_criterion: outputs lack level {level!r}; got {sorted(outputs)}")
    level_out = outputs[level]
    blocks = list(level_out.get("aux", ())) + [level_out]
    for i, block in enumerate(blocks):
      where = "" if i == len(blocks) - 1 else f"['aux'][{i}]"
      _check_level_outputs(level, block, where, batch_size)
    for lv in {level} | {t for d, t in task_supervision.values() if d == level}:
      if (batch[f"{lv}/masks"].ndim != 4 or batch[f"{lv}/masks"].shape[0] != batch_size
          or batch[f"{lv}/valid"].shape != batch[f"{lv}/masks"].shape[:2]):
        raise ValueError(f"aims_set_criterion: batch['{lv}/masks'] {batch[f'{lv}/masks'].shape} "
                         f"and batch['{lv}/valid'] {batch[f'{lv}/valid'].shape} must be "
                         f"[B, N, h, w] and [B, N] with B={batch_size}")
    gt_masks, gt_valid, swapped = _decoder_targets(batch, level, task, task_supervision)
    level_tasks = jnp.asarray(
        [t for t, (d, _) in task_supervision.items() if d == level] or [-1], jnp.int32)  # [T]
    active = (task[:, None] == level_tasks[None, :]).any(axis=1) & region_any  # [B]
    supervised = gt_valid & active[:, None]  # [B, N]
    num_masks = jnp.maximum(supervised.sum().astype(jnp.float32), 1.0)  # []
    shapes = {(b["logits"].shape, b["masks"].shape) for b in blocks}
    if len(shapes) != 1:
      raise ValueError(f"aims_set_criterion: outputs[{level!r}] and its 'aux' predictions must "
                       f"share shapes (logits, masks); got {sorted(shapes)}")
    # Static sample layout: only the positions of this level's sample types are scored.
    rows = None if sample_tasks is None else np.asarray(
        [g for g, t in enumerate(sample_tasks) if task_supervision.get(t, (None,))[0] == level],
        np.int32)  # [B_L]
    if rows is not None:
      off_layout = active.at[rows].set(False)  # [B]
      terms[f"{level}/off_layout"] = off_layout.sum().astype(jnp.float32)
    pick = (lambda x: x) if rows is None else (lambda x: jnp.take(x, rows, axis=0))
    sub = {"gt_masks": pick(gt_masks), "active": pick(active), "num_masks": num_masks,
           "region": pick(region), "cfg": cfg}
    block_keys = jax.random.split(level_key, len(blocks))  # [K] keys

    # Final prediction: matched on the whole batch (the association loss needs every sample's
    # matches), scored on the supervising samples.
    loss_key, pred_idx, matched = _match(
        block_keys[-1], level_out["logits"], level_out["masks"], gt_masks, gt_valid, region,
        cfg, matcher)  # [B, N] x 2
    if rows is None or rows.size:
      final = _matched_losses(loss_key, pick(level_out["logits"]), pick(level_out["masks"]),
                              pick(pred_idx), pick(matched), **sub)  # 3 x []
    else:
      final = (jnp.zeros((), jnp.float32),) * 3
    loss_obj, loss_mask, loss_dice = final
    final_weighted = (cfg["class_weight"] * loss_obj + cfg["mask_weight"] * loss_mask
                      + cfg["dice_weight"] * loss_dice)  # []
    aux_weighted = jnp.zeros((), jnp.float32)
    if len(blocks) > 1 and (rows is None or rows.size):
      def aux_block(xs):
        """Matches one auxiliary prediction on the level's samples and returns its 3 losses."""
        block_key, logits, masks = xs
        loss_key, idx, hit = _match(block_key, logits, masks, sub["gt_masks"], pick(gt_valid),
                                    sub["region"], cfg, matcher)  # [B_L, N] x 2
        return _matched_losses(loss_key, logits, masks, idx, hit, **sub)

      stacked_logits = jnp.stack([pick(b["logits"]) for b in blocks[:-1]])  # [K-1, B_L, Q]
      stacked_masks = jnp.stack([pick(b["masks"]) for b in blocks[:-1]])  # [K-1, B_L, Q, h, w]
      aux_obj, aux_mask, aux_dice = jax.lax.map(
          aux_block, (block_keys[:-1], stacked_logits, stacked_masks),
          batch_size=min(cfg["block_batch"], len(blocks) - 1))  # [K-1] each
      aux_weighted = (cfg["class_weight"] * aux_obj + cfg["mask_weight"] * aux_mask
                      + cfg["dice_weight"] * aux_dice).sum()  # []
    total = total + final_weighted + aux_weighted  # []
    terms[f"{level}/loss_obj"] = loss_obj
    terms[f"{level}/loss_mask"] = loss_mask
    terms[f"{level}/loss_dice"] = loss_dice
    terms[f"{level}/loss_aux"] = aux_weighted
    own = batch[f"{level}/valid"].shape[1]
    final_matches[level] = (pred_idx[:, :own],
                            matched[:, :own] & ~swapped[:, None])  # [B, N_L] x 2

  for out_key, gt_key, valid_key, high, low in ASSOCIATIONS:
    if out_key not in outputs:
      continue
    expected = (batch_size, outputs[high]["logits"].shape[1], outputs[low]["logits"].shape[1])
    if outputs[out_key].shape != expected:
      raise ValueError(f"aims_set_criterion: outputs[{out_key!r}] must be [B, Q_{high}, Q_{low}] "
                       f"= {expected}, got {outputs[out_key].shape}")
    loss_assoc = association_loss(
        outputs[out_key], batch[gt_key], *final_matches[high], *final_matches[low],
        batch[valid_key].astype(jnp.bool_))
    terms[f"assoc/loss_{out_key[-2:]}"] = loss_assoc
    total = total + cfg["assoc_weight"] * loss_assoc  # []
  return total, terms
