"""AIMS through the one trainer, end to end, on the synthetic default (tests/aims_micro.py).

* An uninterrupted 6-step run writes metrics.jsonl with every loss term, checkpoints, and
  `W/eval/6/` with per-level COCO results and ground truth that pycocotools `COCO.loadRes`
  accepts, and `metrics.json` with every AIMS metric.
* Resume: a run that saved at step 2, logged steps 3-4 and lost its step-4 checkpoint (what a
  SIGKILL between two saves leaves) is re-run with the same command; it resumes from step 2 and
  logs, at every step, the losses of the uninterrupted run (rtol 1e-5). The SIGKILL mechanics
  themselves are tested on the toy model in test_trainer_resume.py.
"""

import json
import os
import shutil

import numpy as np
from pycocotools.coco import COCO

import aims_micro
from hiseg_jax.train import metrics_writer
from hiseg_jax.train import trainer

METRICS = ('AP_part', 'AP50_part', 'AP75_part', 'AP_entity', 'AP50_entity', 'AP75_entity',
           'AR_ep', 'AP_relation', 'AP50_relation', 'AP75_relation', 'AP_entity_re',
           'AP50_entity_re', 'AP75_entity_re', 'AR_re')
TERMS = ('loss', 'lr', 'grad_norm', 'assoc/loss_ep', 'assoc/loss_re') + tuple(
    f'{level}/{term}' for level in ('part', 'entity', 'relation')
    for term in ('loss_obj', 'loss_mask', 'loss_dice', 'loss_aux'))


def _config(total_steps):
  config = aims_micro.get_config()
  config.total_steps = total_steps
  return config


def _train(workdir):
  return [r for r in metrics_writer.read_records(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == 'train']


def test_train_evaluate_and_resume(tmp_path):
  reference_dir = str(tmp_path / 'reference')
  final = trainer.train_and_evaluate(_config(6), reference_dir)
  assert set(final) == set(METRICS)
  assert all(np.isfinite(v) and 0 <= v <= 100 for v in final.values())
  reference = _train(reference_dir)
  assert [r['step'] for r in reference] == list(range(1, 7))
  for record in reference:
    for term in TERMS:
      assert np.isfinite(record[term]), (record['step'], term)
  eval_dir = os.path.join(reference_dir, 'eval', '6')
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    assert json.load(f) == final
  for subset, levels in (('entity_part', ('entity', 'part')),
                         ('relation_entity', ('relation', 'entity'))):
    for level in levels:
      gt = COCO(os.path.join(eval_dir, subset, f'{level}_gt.json'))
      assert len(gt.getImgIds()) == 4 and gt.getAnnIds()
      results = gt.loadRes(os.path.join(eval_dir, subset, f'{level}_results.json'))
      assert set(results.getImgIds()) == set(gt.getImgIds())

  resumed_dir = str(tmp_path / 'resumed')
  trainer.train_and_evaluate(_config(4), resumed_dir)
  shutil.rmtree(os.path.join(resumed_dir, 'checkpoints', '4'))
  assert len(_train(resumed_dir)) == 4
  trainer.train_and_evaluate(_config(6), resumed_dir)
  resumed = _train(resumed_dir)
  assert [r['step'] for r in resumed] == list(range(1, 7))
  for got, want in zip(resumed, reference):
    for term in TERMS:
      np.testing.assert_allclose(got[term], want[term], rtol=1e-5,
                                 err_msg=f'step {want["step"]} {term}')
