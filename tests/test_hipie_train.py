"""HIPIE through the one trainer, end to end, on the synthetic default (tests/hipie_micro.py).

One 4-step run (checkpoints at 2 and 4, final evaluation) is shared by the tests of this file:

* it logs every step with finite losses of every thing / stuff term (main, encoder,
  denoising), checkpoints steps 2 and 4, and writes `W/eval/4/` with the panoptic, referring
  and part result files and `metrics.json` (PQ, mask / box AP, mIoU, refer_oIoU, part_mIoU);
* resume: a copy of that run that lost its step-4 checkpoint (what a SIGKILL between two
  saves leaves) is re-run with the same config; it resumes from step 2, restoring the train
  state and the task-mixture iterator, and logs at steps 3 and 4 the losses of the
  uninterrupted run (rtol 1e-5). Its evaluation passes are switched off (they do not touch
  training and would only add compiles);
* `criterion_targets` on a real mixed batch of the training iterator puts a referring
  sample's positive at token 0 only and marks the stuff targets inactive there.

XLA compiles without most optimisations here (tests/fast_compile.py): compiling the train step
dominates the file and this more than halves it; both runs of the resume check compile the
same way.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from pycocotools.coco import COCO

import hipie_micro
from data_pipelines import hipie_samples
from fast_compile import fast_compile
from hiseg_jax.hipie import spec as hipie_spec
from hiseg_jax.text.prompts import sentence_as_first_token
from hiseg_jax.train import metrics_writer
from hiseg_jax.train import trainer

STEPS = 4
METRICS = ('PQ', 'mask_AP', 'box_AP', 'mIoU', 'refer_oIoU', 'part_mIoU')
TERMS = ('loss', 'lr', 'grad_norm', 'things/truncated', 'stuff/truncated') + tuple(
    f'{branch}/{head}loss_{term}'
    for branch, heads, terms in (
        ('thing', ('', 'dn/'), ('ce', 'bbox', 'giou', 'mask', 'dice')),
        ('stuff', ('', 'enc/', 'dn/'), ('ce', 'bbox', 'giou', 'mask', 'dice')))
    for head in heads for term in terms) + (
        'thing/loss_iou', 'thing/enc/loss_ce', 'thing/enc/loss_bbox', 'thing/enc/loss_giou')
NOT_LOSSES = ('step', 'split', 'steps_per_sec', 'images_per_sec')


def _train_records(workdir):
  return [r for r in metrics_writer.read_records(os.path.join(workdir, 'metrics.jsonl'))
          if r['split'] == 'train']


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """The uninterrupted 4-step run: (workdir, returned final metrics)."""
  workdir = str(tmp_path_factory.mktemp('hipie') / 'reference')
  config = hipie_micro.get_config()
  config.total_steps = STEPS
  with fast_compile():
    final = trainer.train_and_evaluate(config, workdir)
  return workdir, final


def test_train_checkpoint_and_evaluate(run):
  workdir, final = run
  records = _train_records(workdir)
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))
  for record in records:
    for term in TERMS:
      assert record.get(term) is not None and np.isfinite(record[term]), (record['step'], term)
  assert records[-1]['loss'] > 0
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['2', '4']

  eval_dir = os.path.join(workdir, 'eval', str(STEPS))
  with open(os.path.join(eval_dir, 'metrics.json')) as f:
    written = json.load(f)
  assert written == final
  assert set(METRICS) <= set(written), sorted(written)
  assert all(np.isfinite(v) and 0 <= v <= 100 for v in written.values()), written
  gt = COCO(os.path.join(eval_dir, 'panoptic', 'instances_gt.json'))
  assert len(gt.getImgIds()) == 4 and gt.getAnnIds()
  for kind in ('segm', 'bbox'):
    results = gt.loadRes(os.path.join(eval_dir, 'panoptic', f'instances_{kind}.json'))
    assert set(results.getImgIds()) <= set(gt.getImgIds()) and results.getAnnIds(), kind
  with open(os.path.join(eval_dir, 'panoptic', 'pred_panoptic.json')) as f:
    assert len(json.load(f)['annotations']) == 4
  for task in ('referring', 'part'):
    assert os.listdir(os.path.join(eval_dir, task)), task


def test_resume_reproduces_the_uninterrupted_losses(run):
  workdir, _ = run
  resumed = os.path.join(os.path.dirname(workdir), 'resumed')
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, 'checkpoints', str(STEPS)))
  shutil.rmtree(os.path.join(resumed, 'eval'))
  config = hipie_micro.get_config()
  config.total_steps = STEPS
  config.eval.update({'panoptic': '', 'referring': '', 'part': ''})
  with fast_compile():
    assert trainer.train_and_evaluate(config, resumed) == {}
  want, got = _train_records(workdir), _train_records(resumed)
  assert [r['step'] for r in got] == list(range(1, STEPS + 1))
  assert sorted(os.listdir(os.path.join(resumed, 'checkpoints'))) == ['2', '4']
  for g, w in zip(got[2:], want[2:]):
    terms = set(w) - set(NOT_LOSSES)
    assert set(g) - set(NOT_LOSSES) == terms
    for term in sorted(terms):
      np.testing.assert_allclose(g[term], w[term], rtol=1e-5, err_msg=f'step {w["step"]} {term}')


def test_criterion_targets_on_a_mixed_batch(run):
  workdir, _ = run
  config = hipie_micro.get_config()
  iterator = hipie_spec.make_train_iterator(config, workdir)
  referring_id = hipie_samples.TASK_IDS['referring']
  # Task groups of 2 in batches of 4: a batch mixing referring and other samples comes soon.
  for _ in range(12):
    batch = next(iterator)
    referring = np.asarray(batch['task']) == referring_id  # [B]
    if referring.any() and not referring.all():
      break
  assert referring.any() and not referring.all(), 'no mixed batch in 12 draws'
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  text = jnp.zeros(batch['text/ids'].shape + (4,))  # [B, T, 4]
  _, text_mask = sentence_as_first_token(text, batch['text/mask'], jnp.asarray(referring))
  targets = hipie_spec.criterion_targets(batch, text_mask)
  segments = jax.device_get(hipie_spec.all_segments(batch))
  thing, stuff = jax.device_get(targets['thing']), jax.device_get(targets['stuff'])
  num_tokens = batch['text/ids'].shape[1]
  first = np.arange(num_tokens) == 0  # [T]
  for b in range(len(referring)):
    valid = segments['valid'][b]  # [N']
    np.testing.assert_array_equal(thing['valid'][b], valid)
    np.testing.assert_array_equal(stuff['positive_map'][b], thing['positive_map'][b])
    assert bool(stuff['active'][b]) == (not referring[b])
    if referring[b]:
      assert valid.sum() == 1, f'referring sample {b}: {valid.sum()} targets'
      assert segments['positive_map'][b].sum() > 1  # the pipeline's map spans the sentence
      assert np.asarray(batch['text/mask'][b]).sum() > 1  # the sentence, pooled to token 0
      np.testing.assert_array_equal(thing['positive_map'][b], valid[:, None] & first[None])
      np.testing.assert_array_equal(thing['text_mask'][b], first)
    else:
      np.testing.assert_array_equal(thing['positive_map'][b], segments['positive_map'][b])
      assert thing['positive_map'][b][valid].any(1).all(), f'sample {b}: a target without tokens'
      np.testing.assert_array_equal(thing['text_mask'][b], np.asarray(batch['text/mask'][b]) > 0)
  assert np.asarray(thing.get('active', True)).all()  # the thing criterion trains every sample
