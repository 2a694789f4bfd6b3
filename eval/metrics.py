"""Command line: one metric from files in the official formats, printed as JSON.

  python -m eval.metrics pq --gt_json_file G.json --pred_json_file P.json \
      [--gt_folder G/] [--pred_folder P/]      (pq_compute's fractions, plus "summary": the
                                                table panopticapi prints, in percent)
  python -m eval.metrics coco --gt_json G.json --results_json R.json [--iou_type segm|bbox] \
      [--class_agnostic]
  python -m eval.metrics partpq ppq_ppp_59_57_cvpr21_default BASEPATH_GT BASEPATH_PRED IMAGES_JSON
  python -m eval.metrics miou --gt_folder G/ --pred_folder P/ --num_classes K \
      --convention ade20k|pascal
  python -m eval.metrics miou --parts --gt_folder G/ --pred_folder P/      (mIoU_PartS, .tif GT)
  python -m eval.metrics refer --gt_json G.json --pred_json P.json
  python -m eval.metrics psg --psg_json psg.json --gt_folder G/ --pred_folder SUBMISSION/ \
      [--split test]

`refer` files are lists of {"id": expression id, "segmentation": COCO RLE and/or "bbox":
[x, y, w, h]}, one per expression. `miou` pairs files by name stem: ground truth `<stem>.png`
(`<stem>.tif` with --parts), prediction `<stem>.png` holding training ids.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from eval.coco_eval import coco_evaluate
from eval.miou import miou, miou_parts, ppp_part_labels
from eval.panoptic_quality import pq_compute
from eval.part_pq import load_spec, part_pq_compute
from eval.psg_recall import load_psg_ground_truth, load_psg_predictions, psg_recall
from eval.referring import referring_boxes, referring_masks
from eval.writers import read_semantic_png

PARTPQ_SPECS = ("ppq_ppp_59_57_cvpr21_default",)


def _stems(folder: str, ext: str) -> dict[str, str]:
  """Maps file stem -> path for files ending in `ext` directly in `folder`."""
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"folder {folder} does not exist")
  return {n[:-len(ext)]: os.path.join(folder, n) for n in sorted(os.listdir(folder))
          if n.endswith(ext)}


def run_miou(args) -> dict:
  """mIoU / mIoU_PartS from label PNG folders."""
  gt_ext = ".tif" if args.parts else ".png"
  gts, preds = _stems(args.gt_folder, gt_ext), _stems(args.pred_folder, ".png")
  for stem, path in preds.items():
    if stem not in gts:
      raise KeyError(f"{path}: prediction for image {stem}, which {args.gt_folder} does not have")
  pairs = []
  for stem, gt_path in gts.items():
    if stem not in preds:
      raise FileNotFoundError(f"no prediction {stem}.png in {args.pred_folder}")
    if args.parts:
      with Image.open(gt_path) as im:
        gt = ppp_part_labels(np.array(im).astype(np.int64), gt_path)  # [H, W]
    else:
      gt = read_semantic_png(gt_path)  # [H, W]
    pairs.append((gt, read_semantic_png(preds[stem], expected_hw=gt.shape)))
  if args.parts:
    return miou_parts(pairs)
  if args.num_classes is None:
    raise ValueError("miou needs --num_classes")
  return miou(pairs, args.num_classes, args.convention)


def run_refer(args) -> dict:
  """Referring oIoU / mIoU / Prec@t and box P@0.5 from expression lists."""
  with open(args.gt_json) as f:
    gts = {e["id"]: e for e in json.load(f)}
  with open(args.pred_json) as f:
    preds = json.load(f)
  by_id = {}
  for p in preds:
    if p["id"] not in gts:
      raise KeyError(f"{args.pred_json}: prediction for expression id {p['id']}, which "
                     f"{args.gt_json} does not have")
    if p["id"] in by_id:
      raise ValueError(f"{args.pred_json}: expression id {p['id']} is predicted twice")
    by_id[p["id"]] = p
  out = {}
  ids = list(gts)
  if all("segmentation" in gts[i] for i in ids):
    g_masks, p_masks = [], []
    for i in ids:
      g = mask_utils.decode(gts[i]["segmentation"]).astype(bool)  # [H, W]
      p = by_id.get(i)
      if p is not None and "segmentation" in p:
        pm = mask_utils.decode(p["segmentation"]).astype(bool)  # [H, W]
        if pm.shape != g.shape:
          raise ValueError(f"{args.pred_json}: expression id {i} mask size {pm.shape} differs "
                           f"from the ground truth's {g.shape}")
      else:
        pm = np.zeros_like(g)  # [H, W]
      g_masks.append(g)
      p_masks.append(pm)
    out.update(referring_masks(g_masks, p_masks))
  if all("bbox" in gts[i] for i in ids):
    g_boxes = np.array([gts[i]["bbox"] for i in ids], np.float64).reshape(-1, 4)  # [N, 4]
    p_boxes = np.array([by_id[i]["bbox"] if i in by_id and "bbox" in by_id[i] else [0, 0, 0, 0]
                        for i in ids], np.float64).reshape(-1, 4)  # [N, 4]
    out.update(referring_boxes(g_boxes, p_boxes))
  return out


def run_psg(args) -> dict:
  """PSG R@K / mR@K from psg.json + an OpenPSG submission folder."""
  ids, gts, num_predicates = load_psg_ground_truth(args.psg_json, args.gt_folder, args.split)
  preds = load_psg_predictions(args.pred_folder, ids, [g.masks.shape[1:] for g in gts])
  return psg_recall(gts, preds, num_predicates)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser.

  Returns:
    argparse parser with one sub-command per metric.
  """
  parser = argparse.ArgumentParser(prog="python -m eval.metrics", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="metric", required=True)
  p = sub.add_parser("pq", help="PQ / SQ / RQ (panopticapi pq_compute)")
  p.add_argument("--gt_json_file", required=True)
  p.add_argument("--pred_json_file", required=True)
  p.add_argument("--gt_folder", default=None)
  p.add_argument("--pred_folder", default=None)
  p = sub.add_parser("coco", help="mask / box AP and AR (pycocotools)")
  p.add_argument("--gt_json", required=True)
  p.add_argument("--results_json", required=True)
  p.add_argument("--iou_type", default="segm", choices=("segm", "bbox"))
  p.add_argument("--class_agnostic", action="store_true")
  p = sub.add_parser("partpq", help="PartPQ (panoptic_parts eval_PartPQ)")
  p.add_argument("eval_spec", help=f"one of {PARTPQ_SPECS}, or a spec JSON like "
                                   "eval/ppp_partpq_spec.json")
  p.add_argument("basepath_gt")
  p.add_argument("basepath_pred")
  p.add_argument("images_json")
  p = sub.add_parser("miou", help="mIoU (detectron2 semantics) or mIoU_PartS")
  p.add_argument("--gt_folder", required=True)
  p.add_argument("--pred_folder", required=True)
  p.add_argument("--num_classes", type=int, default=None)
  p.add_argument("--convention", default="pascal", choices=("ade20k", "pascal"))
  p.add_argument("--parts", action="store_true", help="mIoU_PartS on Pascal-Panoptic-Parts .tif")
  p = sub.add_parser("refer", help="referring oIoU / mIoU / Prec@t, box P@0.5")
  p.add_argument("--gt_json", required=True)
  p.add_argument("--pred_json", required=True)
  p = sub.add_parser("psg", help="PSG R@K / mR@K (OpenPSG sgdet, pan_seg)")
  p.add_argument("--psg_json", required=True)
  p.add_argument("--gt_folder", required=True)
  p.add_argument("--pred_folder", required=True)
  p.add_argument("--split", default="test", choices=("test", "train", "all"))
  return parser


def pq_summary(results: dict) -> dict:
  """The table panopticapi's `pq_compute` prints: PQ, SQ, RQ in percent and N per group.

  Args:
    results: `pq_compute` output (fractions).

  Returns:
    {"All" | "Things" | "Stuff": {"PQ", "SQ", "RQ", "N"}}.
  """
  return {group: {"PQ": 100 * results[group]["pq"], "SQ": 100 * results[group]["sq"],
                  "RQ": 100 * results[group]["rq"], "N": results[group]["n"]}
          for group in ("All", "Things", "Stuff")}


def main(argv: Sequence[str] | None = None) -> dict:
  """Runs one metric and prints its JSON.

  Args:
    argv: command-line arguments (default sys.argv[1:]).

  Returns:
    The printed result.
  """
  args = build_parser().parse_args(argv)
  if args.metric == "pq":
    out = pq_compute(args.gt_json_file, args.pred_json_file, args.gt_folder, args.pred_folder)
    out["summary"] = pq_summary(out)
  elif args.metric == "coco":
    out = coco_evaluate(args.gt_json, args.results_json, args.iou_type, args.class_agnostic)
  elif args.metric == "partpq":
    spec = load_spec() if args.eval_spec in PARTPQ_SPECS else load_spec(args.eval_spec)
    out = part_pq_compute(args.basepath_gt, args.basepath_pred, args.images_json, spec)
  elif args.metric == "miou":
    out = run_miou(args)
  elif args.metric == "refer":
    out = run_refer(args)
  else:
    out = run_psg(args)
  json.dump(out, sys.stdout, indent=1, default=float)
  sys.stdout.write("\n")
  return out


if __name__ == "__main__":
  main()
