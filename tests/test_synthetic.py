"""Tests of the synthetic hierarchical-shapes dataset generator."""

import json
import os
import pickle

import numpy as np
import pytest
import tifffile
from PIL import Image

from configs import hipie as hipie_configs
from data_pipelines import hipie_samples
from data_pipelines import mask_codec
from data_pipelines import synthetic
from data_pipelines.synthetic import __main__ as synthetic_main
from data_pipelines.synthetic import scene as scene_lib
from data_pipelines.synthetic import taxonomy
from hiseg_jax.text import prompts
from hiseg_jax.text.tokenizer import load_bert_tokenizer


def _all_files(root):
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def test_same_seed_gives_byte_identical_files(tmp_path):
  a = synthetic.generate(str(tmp_path / "a"), 4, 2, 96, seed=3)
  synthetic.generate(str(tmp_path / "b"), 4, 2, 96, seed=3)
  synthetic.generate(str(tmp_path / "c"), 4, 2, 96, seed=4)
  fa, fb, fc = (_all_files(tmp_path / k) for k in "abc")
  assert fa.keys() == fb.keys()
  assert all(fa[k] == fb[k] for k in fa), [k for k in fa if fa[k] != fb[k]]
  assert fa["images/train/000000000001.png"] != fc["images/train/000000000001.png"]
  assert a["counts"]["train"]["images"] == 4 and a["counts"]["val"]["images"] == 2


def test_layout_and_official_format_fields(tmp_path):
  out = tmp_path / "syn"
  synthetic.generate(str(out), 3, 2, 96, seed=0)
  expected = [
      "images/train/000000000001.png", "images/val/000000000005.png",
      "panoptic/panoptic_train.json", "panoptic/panoptic_val.json",
      "panoptic/panoptic_train/000000000003.png", "panoptic/panoptic_val/000000000004.png",
      "instances/instances_train.json", "instances/instances_val.json",
      "paco/paco_train.json", "paco/paco_val.json",
      "ppp/labels/training/000000000001.tif", "ppp/labels/validation/000000000005.tif",
      "psg/psg.json", "refcoco/refs(unc).p", "refcoco/instances.json"]
  for rel in expected:
    assert (out / rel).is_file(), rel
  pan = json.loads((out / "panoptic/panoptic_train.json").read_text())
  assert {c["isthing"] for c in pan["categories"]} == {0, 1}
  seg = pan["annotations"][0]["segments_info"][0]
  assert set(seg) >= {"id", "category_id", "area", "bbox", "iscrowd"}
  png = out / "panoptic/panoptic_train/000000000001.png"
  ids = mask_codec.rgb_to_id(np.asarray(Image.open(png)))
  assert set(np.unique(ids).tolist()) == {s["id"] for s in pan["annotations"][0]["segments_info"]}
  paco = json.loads((out / "paco/paco_train.json").read_text())
  parts = [a for a in paco["annotations"] if a["obj_ann_id"] != a["id"]]
  names = {c["id"]: c["name"] for c in paco["categories"]}
  assert parts and all(":" in names[a["category_id"]] for a in parts)
  psg = json.loads((out / "psg/psg.json").read_text())
  assert psg["test_image_ids"] == ["4", "5"]
  d = psg["data"][0]
  assert len(d["annotations"]) == len(d["segments_info"])
  for a in d["annotations"]:
    x0, y0, x1, y1 = a["bbox"]
    assert x1 > x0 and y1 > y0
  with open(out / "refcoco/refs(unc).p", "rb") as f:
    refs = pickle.load(f)
  assert {r["split"] for r in refs} == {"train", "val"}
  assert set(refs[0]["sentences"][0]) == {"tokens", "raw", "sent_id", "sent"}
  uids = tifffile.imread(out / "ppp/labels/training/000000000001.tif")
  assert uids.dtype == np.int32 and uids.shape == (96, 96)
  sids, _, _ = mask_codec.decode_uids(uids, "label")
  assert (sids == 0).any()
  assert set(np.unique(sids).tolist()) - {0} <= set(taxonomy.CATEGORY_IDS.values())


def test_instances_use_polygons_and_rle(tmp_path):
  out = tmp_path / "syn"
  synthetic.generate(str(out), 8, 1, 96, seed=0)
  kinds = set()
  for path in ("instances/instances_train.json", "refcoco/instances.json"):
    for a in json.loads((out / path).read_text())["annotations"]:
      s = a["segmentation"]
      kinds.add("polygon" if isinstance(s, list) else
                ("uncompressed" if isinstance(s["counts"], list) else "compressed"))
  assert kinds == {"polygon", "uncompressed", "compressed"}


def test_scenes_are_learnable_and_consistent():
  size = 128
  classes_seen, words = set(), set()
  for image_id in range(1, 41):
    scene = scene_lib.make_scene(0, image_id, size)
    assert scene.image.shape == (size, size, 3) and scene.image.dtype == np.uint8
    stacked = np.stack([e.mask for e in scene.entities]).sum(0)
    assert (stacked == 1).all(), "entities partition the image"
    for e in scene.entities:
      classes_seen.add(e.category)
      union = np.zeros((size, size), bool)
      for p in e.parts:
        assert p.mask.sum() >= 40, (image_id, e.category, p.name)
        assert not (p.mask & ~e.mask).any()
        union |= p.mask
      if e.parts:
        assert np.array_equal(union, e.mask)
    for r in scene.relations:
      a, b = scene.entities[r.subject].mask, scene.entities[r.object].mask
      grown = np.zeros_like(a)
      grown[1:] |= a[:-1]
      grown[:-1] |= a[1:]
      grown[:, 1:] |= a[:, :-1]
      grown[:, :-1] |= a[:, 1:]
      assert (grown & b).any(), "relations join touching entities"
      assert r.predicate in taxonomy.PREDICATES
    sentences = [s for x in scene.expressions for s in x.sentences]
    assert len(sentences) == len(set(sentences)), "sentences are unique per image"
    for x in scene.expressions:
      assert scene.entities[x.target].isthing
      words.update(w for s in x.sentences for w in s.split())
    things = np.any([e.mask for e in scene.entities if e.isthing], axis=0)
    assert not (scene.void & things).any()
  with_parts = [c for c, parts in taxonomy.THING_PARTS.items() if len(parts) >= 2]
  assert len(with_parts) >= 5 and set(with_parts) <= classes_seen
  assert any("left" in w for w in words) and any("right" in w for w in words)


def test_cli_writes_dataset_and_rerun_leaves_no_stale_files(tmp_path, capsys):
  synthetic_main.main(["--out", str(tmp_path / "cli"), "--num-train", "3", "--num-val", "1",
                       "--image-size", "64", "--seed", "1"])
  assert "wrote 4 images at 64 px" in capsys.readouterr().out
  assert (tmp_path / "cli/images/val/000000000004.png").is_file()
  synthetic_main.main(["--out", str(tmp_path / "cli"), "--num-train", "1", "--num-val", "1",
                       "--image-size", "64", "--seed", "1"])
  assert sorted(os.listdir(tmp_path / "cli/ppp/labels/training")) == ["000000000001.tif"]
  assert sorted(os.listdir(tmp_path / "cli/images/val")) == ["000000000002.png"]


def test_bad_arguments_raise(tmp_path):
  with pytest.raises(ValueError, match="at least one image"):
    synthetic.generate(str(tmp_path), 0, 1, 96, 0)
  with pytest.raises(ValueError, match="at least 64"):
    synthetic.generate(str(tmp_path), 1, 1, 32, 0)
  with pytest.raises(ValueError, match="unknown synthetic split"):
    synthetic.reader_kwargs(str(tmp_path), "test")


def test_vocab_covers_class_names_prompts_and_sentences(tmp_path):
  out = tmp_path / "syn"
  synthetic.generate(str(out), 6, 2, 64, seed=0)
  tok = load_bert_tokenizer(str(out / "text/vocab.txt"))
  assert tok.pad_token_id == 0 and tok.convert_ids_to_tokens(0) == "[PAD]"
  assert len(tok) <= hipie_configs.get_config("runlocal").model.text_encoder.vocab_size

  def assert_known(text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids and tok.unk_token_id not in ids, (text, tok.convert_ids_to_tokens(ids))

  pan = json.loads((out / "panoptic/panoptic_train.json").read_text())
  psg = json.loads((out / "psg/psg.json").read_text())
  with open(out / "refcoco/refs(unc).p", "rb") as f:
    refs = pickle.load(f)
  sentences = [s["sent"] for r in refs for s in r["sentences"]]
  assert {r["split"] for r in refs} == {"train", "val"} and sentences
  for text in ([c["name"] for c in pan["categories"]] + psg["predicate_classes"] + sentences
               + list(taxonomy.COLOUR_NAMES)):
    assert_known(text)
  for task, fmt in (("panoptic", "coco_panoptic"), ("part", "pascal_panoptic_parts"),
                    ("part", "paco")):
    vocab = hipie_samples.synthetic_vocabulary(task, fmt)
    prompt = prompts.build_class_prompt(vocab.names, tok)
    assert tok.unk_token_id not in prompt.input_ids.tolist(), (task, fmt)
    assert tok.convert_tokens_to_ids(".") in prompt.input_ids.tolist()
