"""`python -m eval.evaluate` on a checkpoint of the micro AIMS config (tests/aims_micro.py).

A 2-step run (checkpoints at steps 1 and 2, final evaluation at 2) is the reference. The command
restores the latest checkpoint into a separate folder; its `metrics.json` and printed metrics must
equal the trainer's own evaluation at step 2 exactly, and every `<level>_results.json` it writes
must load with pycocotools `COCO.loadRes` against the `<level>_gt.json` beside it. A step that was
not saved, and a workdir without checkpoints, end the command with a message naming what exists.
"""

import json
import os
import subprocess
import sys

from pycocotools.coco import COCO

import aims_micro
from hiseg_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MICRO_CONFIG = os.path.join(REPO, 'tests', 'aims_micro.py')
LEVELS = {'entity_part': ('entity', 'part'), 'relation_entity': ('relation', 'entity')}


def _evaluate(workdir, out, *flags):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.path.join(REPO, 'tests')]),
             JAX_PLATFORMS='cpu')
  return subprocess.run(
      [sys.executable, '-m', 'eval.evaluate', '--config', MICRO_CONFIG, '--workdir',
       str(workdir), '--out', str(out), *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def test_evaluate_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  config = aims_micro.get_config()
  config.total_steps = 2
  config.checkpoint_every = 1
  final = trainer.train_and_evaluate(config, str(workdir))
  with open(workdir / 'eval' / '2' / 'metrics.json') as f:
    assert json.load(f) == final

  out = tmp_path / 'out'
  done = _evaluate(workdir, out)
  assert done.returncode == 0, done.stderr[-3000:]
  assert json.loads(done.stdout.strip().splitlines()[-1]) == {'step': 2, 'metrics': final}
  assert 'eval ppp_val' in done.stderr  # the progress bar
  with open(out / 'metrics.json') as f:
    assert json.load(f) == final
  for subset, levels in LEVELS.items():
    for level in levels:
      gt = COCO(str(out / subset / f'{level}_gt.json'))
      assert len(gt.getImgIds()) == 4 and gt.getAnnIds()
      results = gt.loadRes(str(out / subset / f'{level}_results.json'))
      assert results.getAnnIds() and set(results.getImgIds()) == set(gt.getImgIds())
      # Evaluated on a 96 px canvas (the micro config's eval.image_size), the result masks come
      # back at the original 64 px image size.
      for ann in results.loadAnns(results.getAnnIds()):
        image = gt.loadImgs(ann['image_id'])[0]
        assert results.annToMask(ann).shape == (image['height'], image['width']) == (64, 64)

  missing = _evaluate(workdir, tmp_path / 'missing', '--step=5')
  assert missing.returncode == 1
  assert 'no checkpoint' in missing.stderr and 'complete checkpoints: [1, 2]' in missing.stderr
  assert not (tmp_path / 'missing').exists()

  bad_nms = _evaluate(workdir, tmp_path / 'bad_nms', '--config.eval.mask_nms=soft')
  assert bad_nms.returncode == 1
  assert "config.eval.mask_nms must be one of ('none', 'matrix'), got 'soft'" in bad_nms.stderr

  empty = _evaluate(tmp_path / 'empty', tmp_path / 'missing')
  assert empty.returncode == 1
  assert 'no checkpoints in' in empty.stderr
