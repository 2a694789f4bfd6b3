"""Tests for data_pipelines.transforms: geometry, flips, masks at 1/4, boxes, decoding errors."""

import dataclasses

import numpy as np
import pytest
from PIL import Image

import toy_records
from data_pipelines import transforms


def _rect(h, w, y0, y1, x0, x1):
  m = np.zeros((h, w), bool)
  m[y0:y1, x0:x1] = True
  return m


def test_flip_sentence_swaps_whole_words_and_keeps_case():
  assert transforms.flip_sentence("the box left of the disc") == "the box right of the disc"
  assert (transforms.flip_sentence("Leftmost man on the right-hand side, LEFT")
          == "Rightmost man on the left-hand side, RIGHT")
  assert transforms.flip_sentence("bright light, cleft, wrights") == "bright light, cleft, wrights"
  geom = transforms.eval_geometry(10, 10, 16)
  assert transforms.warp_sentences(["left"], geom) == ["left"]
  assert transforms.warp_sentences(["left", "Right"], dataclasses.replace(geom, flip=True)) == [
      "right", "Left"]


def test_flip_mirrors_image_masks_and_valid_inside_the_resized_image():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (30, 50, 3)).astype(np.uint8)
  masks = [_rect(30, 50, 5, 20, 3, 17), _rect(30, 50, 0, 30, 40, 50)]
  plain = transforms.eval_geometry(30, 50, 64)
  flipped = dataclasses.replace(plain, flip=True)
  h, w = plain.resized_height, plain.resized_width
  assert (h, w) == (38, 64)
  img0, valid0 = transforms.warp_image(image, plain)
  img1, valid1 = transforms.warp_image(image, flipped)
  np.testing.assert_array_equal(img1[:h, :w], img0[:h, :w][:, ::-1])
  np.testing.assert_array_equal(valid1, valid0)
  assert valid0.sum() == h * w and not valid0[h:].any()
  m0, m1 = transforms.warp_masks(masks, plain), transforms.warp_masks(masks, flipped)
  np.testing.assert_array_equal(m1[:, :h, :w], m0[:, :h, :w][:, :, ::-1])
  # The right-edge rectangle lands on the left edge after the flip.
  assert m1[1, :h, 0].all() and not m1[1, :h, -1].any()


def test_random_geometry_is_deterministic_and_keeps_the_anchor():
  for seed in range(40):
    g1 = transforms.random_geometry(60, 90, 64, np.random.default_rng(seed), (0.5, 2.0), 0.5,
                                    anchor_box=(70, 40, 15, 12))
    g2 = transforms.random_geometry(60, 90, 64, np.random.default_rng(seed), (0.5, 2.0), 0.5,
                                    anchor_box=(70, 40, 15, 12))
    assert g1 == g2
    assert 0 <= g1.offset_y <= max(0, g1.resized_height - 64)
    assert 0 <= g1.offset_x <= max(0, g1.resized_width - 64)
    anchor = [_rect(60, 90, 40, 52, 70, 85)]
    uncropped = dataclasses.replace(g1, canvas=256, offset_y=0, offset_x=0)
    # The anchor fits the canvas at every scale drawn here, so none of it is cropped.
    assert transforms.warp_masks(anchor, g1).sum() == transforms.warp_masks(anchor, uncropped).sum()
  flips = [transforms.random_geometry(8, 8, 16, np.random.default_rng(s), (1, 1), 1.0).flip
           for s in range(5)]
  assert all(flips)
  with pytest.raises(ValueError, match="scale_range"):
    transforms.random_geometry(8, 8, 16, np.random.default_rng(0), (1.5, 1.0), 0.5)


def test_crop_drops_what_falls_outside_and_pads_the_rest():
  geom = transforms.Geometry(height=40, width=40, canvas=32, scale=2.0, resized_height=80,
                             resized_width=80, flip=False, offset_y=48, offset_x=0)
  masks = transforms.warp_masks([_rect(40, 40, 0, 10, 0, 10), _rect(40, 40, 30, 40, 0, 10)], geom)
  assert not masks[0].any()  # cropped away entirely
  assert masks[1, 12:32, 0:20].all() and masks[1].sum() == 20 * 20
  image, valid = transforms.warp_image(np.full((40, 40, 3), 7, np.uint8), geom)
  assert valid.all() and (image == 7).all()


def test_downsample_masks_area_vote_and_tiny_instances():
  masks = np.zeros((3, 8, 8), bool)
  masks[0, 0:2, 0:4] = True  # 8 of the 16 pixels of cell (0, 0): kept
  masks[1, 0:2, 0:3] = True  # 6 of 16: lost by the vote, but it is the best cell: kept
  masks[1, 4:5, 4:8] = True  # 4 of 16 in cell (1, 1)
  masks[2, 0:1, 4:8] = True  # a weak cell (4 of 16) beside a full one: only the full one
  masks[2, 4:8, 0:4] = True
  q = transforms.downsample_masks(masks, 4)
  assert q.shape == (3, 2, 2)
  np.testing.assert_array_equal(q[0], [[True, False], [False, False]])
  np.testing.assert_array_equal(q[1], [[True, False], [False, False]])
  np.testing.assert_array_equal(q[2], [[False, False], [True, False]])
  assert transforms.downsample_masks(np.zeros((0, 8, 8), bool), 4).shape == (0, 2, 2)
  with pytest.raises(ValueError, match="divisible by the mask stride 4"):
    transforms.downsample_masks(np.zeros((1, 6, 6), bool), 4)


@pytest.mark.parametrize("stride", [1, 2, 4])
def test_downsample_masks_equals_a_mean_over_cells(stride):
  # Reference: the cell mean >= 1/2, plus the best cell of masks the vote would erase.
  rng = np.random.default_rng(stride)
  masks = rng.random((5, 16, 16)) < np.array([0.02, 0.1, 0.4, 0.6, 0.9])[:, None, None]
  m = 16 // stride
  mean = masks.reshape(5, m, stride, m, stride).mean(axis=(2, 4))  # [5, m, m]
  want = mean >= 0.5
  for i in np.flatnonzero(~want.any(axis=(1, 2)) & masks.any(axis=(1, 2))):
    want[i].flat[np.argmax(mean[i])] = True
  got = transforms.downsample_masks(masks, stride)
  assert got.dtype == bool and got.shape == (5, m, m)
  np.testing.assert_array_equal(got, want)
  if stride == 1:
    np.testing.assert_array_equal(got, masks)


def test_boxes_match_masks():
  masks = np.zeros((3, 64, 64), bool)
  masks[0, 10:20, 4:36] = True
  yy, xx = np.mgrid[:64, :64]
  masks[1] = (yy - 40) ** 2 + (xx - 30) ** 2 <= 81
  boxes = transforms.masks_to_boxes(masks)
  np.testing.assert_allclose(boxes[0], [20 / 64, 15 / 64, 32 / 64, 10 / 64])
  np.testing.assert_allclose(boxes[1], [30.5 / 64, 40.5 / 64, 19 / 64, 19 / 64])
  np.testing.assert_array_equal(boxes[2], 0)
  # The 1/4 masks agree with the boxes to within one 1/4 cell on every side.
  q = transforms.downsample_masks(masks[:2], 4)
  for i in range(2):
    ys, xs = np.nonzero(q[i])
    qbox = np.array([xs.min() * 4, ys.min() * 4, xs.max() * 4 + 4, ys.max() * 4 + 4]) / 64
    cx, cy, w, h = boxes[i]
    np.testing.assert_allclose(qbox, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                               atol=4 / 64 + 1e-6)


def test_keep_largest_and_pad_to():
  np.testing.assert_array_equal(transforms.keep_largest(np.array([5, 1, 9, 5]), 2), [0, 2])
  np.testing.assert_array_equal(transforms.keep_largest(np.array([5, 1]), 3), [0, 1])
  padded = transforms.pad_to(np.ones((2, 3), bool), 4)
  assert padded.shape == (4, 3) and padded[:2].all() and not padded[2:].any()
  with pytest.raises(ValueError):
    transforms.pad_to(np.ones(5), 3)


def test_decode_image_errors_name_the_file(tmp_path):
  record = toy_records.make_record(str(tmp_path), 7, "coco", frozenset({"entity"}), seed=0)
  image = transforms.decode_image(record)
  assert image.shape == (48, 64, 3) and image.dtype == np.uint8
  with pytest.raises(ValueError, match=r"coco_7\.png is 48x64 but the annotation says 40x64"):
    transforms.decode_image(dataclasses.replace(record, height=40))
  missing = dataclasses.replace(record, file_name=str(tmp_path / "nope.png"))
  with pytest.raises(FileNotFoundError, match="image 7: file .*nope.png does not exist"):
    transforms.decode_image(missing)
  (tmp_path / "bad.png").write_bytes(b"not a png")
  with pytest.raises(ValueError, match="cannot decode .*bad.png"):
    transforms.decode_image(dataclasses.replace(record, file_name=str(tmp_path / "bad.png")))
  gray = tmp_path / "gray.png"
  Image.fromarray(np.zeros((48, 64), np.uint8)).save(gray)
  assert transforms.decode_image(dataclasses.replace(record, file_name=str(gray))).shape == (
      48, 64, 3)
