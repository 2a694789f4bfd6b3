"""AIMS evaluation geometry: oracle predictions on a larger evaluation canvas score 100.

`eval.aims_eval` resizes every image onto a canvas of `config.eval.image_size` (96 px in the
micro config, whose images are 64 px), and maps the predicted mask logits back to the original
size (bilinear, then binarised). A predictor that returns the ground truth as logits (+10 inside,
-10 outside) on each image's window of the canvas it is given, resized there by nearest
neighbour, must then score AP 100 at every level and AR 100 for both associations: each
64 px output pixel's bilinear sample of the 96 px canvas puts weight 0.5625 > 1/2 on a canvas
pixel copied from that same pixel, so the round trip is exact, and any disagreement between the
canvas the pipeline builds, the window the evaluation cuts and the resize back shows up as lost
AP.
"""

import numpy as np
import pytest
from PIL import Image

import aims_micro
from data_pipelines import dataset_config
from data_pipelines import pipeline
from data_pipelines import synthetic
from eval import aims_eval
from hiseg_jax.aims import spec
from hiseg_jax.train import sharding


def _to_canvas(masks, window, canvas):
  """Nearest-resizes bool [K, H, W] masks into the top-left window of a canvas -> [K, S, S]."""
  h, w = int(window[0]), int(window[1])
  out = np.zeros((len(masks), canvas, canvas), bool)  # [K, S, S]
  for k, m in enumerate(masks):
    img = Image.fromarray(m.astype(np.uint8) * 255).resize((w, h), Image.NEAREST)
    out[k, :h, :w] = np.asarray(img) > 127
  return out


def _oracle(config, sources, dataset_name, levels, assoc_key):
  """A `predict` that returns each batch's ground truth as canvas logits, in pipeline order."""
  section = spec.input_section(config)
  section.image_size = canvas = config.eval.image_size
  built = pipeline.build_eval_pipeline(section, sources, dataset_name)
  source = sources[dataset_name]
  by_id = {int(source.meta(i).image_id): i for i in range(len(source))}
  batches = []
  for host_batch in iter(built.dataset):
    ids = np.asarray(host_batch['image_id'])  # [B]
    windows = aims_eval.valid_window(host_batch['orig_size'], canvas)  # [B, 2]
    truth = [aims_eval.association_ground_truth(source[by_id[int(i)]], levels) if i >= 0
             else None for i in ids]
    sizes = [max(len(t[k]) for t in truth if t is not None) + 1 for k in (0, 1)]
    pred = {level: {'mask_logits': np.full((len(ids), n, canvas, canvas), -10.0,
                                           np.float32),  # [B, K, S, S]
                    'scores': np.zeros((len(ids), n), np.float32)}  # [B, K]
            for level, n in zip(levels, sizes)}
    pred[assoc_key] = np.zeros((len(ids),) + tuple(sizes), np.float32)  # [B, Kh, Kl]
    for b, t in enumerate(truth):
      if t is None:
        continue
      for level, masks in zip(levels, t[:2]):
        pred[level]['mask_logits'][b, :len(masks)] = np.where(
            _to_canvas(masks, windows[b], canvas), 10.0, -10.0)
        pred[level]['scores'][b, :len(masks)] = 1.0
      pred[assoc_key][b, t[2][:, 0], t[2][:, 1]] = 1.0
    batches.append((canvas, pred))
  calls = iter(batches)

  def predict(variables, inputs, window):
    del variables
    expected_canvas, pred = next(calls)
    assert inputs['image'].shape[1:3] == (expected_canvas, expected_canvas)
    assert np.array_equal(np.asarray(window), aims_eval.valid_window(
        np.full((len(window), 2), 64), expected_canvas))
    return pred
  return predict


@pytest.mark.parametrize('subset', sorted(aims_eval.SUBSETS))
def test_oracle_on_a_larger_canvas_scores_100(tmp_path, subset):
  config = aims_micro.get_config()
  assert config.eval.image_size == 96 and config.synthetic.image_size == 64
  # Ground-truth masks in several pieces would be split (tests/test_split_components.py).
  config.eval.split_components = ()
  root = tmp_path / 'data'
  synthetic.generate(str(root), num_train=1, num_val=4, image_size=64, seed=0)
  key, levels, assoc_key = aims_eval.SUBSETS[subset]
  name = config.eval[key]
  sources = dataset_config.build_sources(config.datasets, [name], str(root))
  predict = _oracle(config, sources, name, levels, assoc_key)
  metrics = aims_eval._evaluate_subset(  # pylint: disable=protected-access
      predict, None, config, sources, name, levels, assoc_key, str(tmp_path / 'out'),
      sharding.make_mesh(config.mesh))
  for level in levels:
    for stat in ('AP', 'AP50', 'AP75'):
      assert metrics[f'{stat}_{level}'] == pytest.approx(100.0), (level, stat, metrics)
  assert metrics['AR'] == pytest.approx(100.0), metrics


def test_to_original_rejects_logits_that_do_not_tile_the_canvas():
  logits = np.zeros((2, 40, 40), np.float32)  # [K, h, w]
  with pytest.raises(ValueError, match='dividing the canvas side 96'):
    aims_eval.to_original(logits, 96, (96, 96), (64, 64))
  assert aims_eval.to_original(logits + 1, 80, (80, 60), (64, 48)).all()
