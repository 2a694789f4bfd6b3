"""The trainer's outputs and SIGKILL-then-resume reproducibility (toy model).

An uninterrupted run (in process) is the reference. A second run of the main
command is killed with SIGKILL after its first checkpoint and after it logged
steps past it; re-running the same command must resume and log, at every step,
the losses of the uninterrupted run (float tolerance rtol 1e-5).
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np

import trainer_toy
from hiseg_jax.train import metrics_writer
from hiseg_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL = 16
OVERRIDES = {'total_steps': TOTAL, 'checkpoint_every': 4, 'eval_every': 8,
             'log_every': 1}


def _config():
  config = trainer_toy.get_config()
  for key, value in OVERRIDES.items():
    config[key] = value
  return config


def _command(workdir):
  flags = [f'--config.{k}={v}' for k, v in OVERRIDES.items()]
  return [sys.executable, '-m', 'hiseg_jax.main', '--config',
          os.path.join(REPO, 'tests', 'trainer_toy.py'), '--workdir', workdir,
          '--config.data.delay_s=0.2'] + flags


def _env():
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')


def _train_records(workdir):
  records = metrics_writer.read_records(os.path.join(workdir, 'metrics.jsonl'))
  return [r for r in records if r['split'] == 'train']


def _wait_for(predicate, process, timeout):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(0.05)
  raise AssertionError('timed out waiting for the training subprocess')


def test_outputs_and_kill_resume(tmp_path):
  reference_dir = str(tmp_path / 'reference')
  final = trainer.train_and_evaluate(_config(), reference_dir)
  assert set(final) == {'mse'}
  reference = metrics_writer.read_records(
      os.path.join(reference_dir, 'metrics.jsonl'))
  train = [r for r in reference if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(1, TOTAL + 1))
  for record in train:
    assert {'loss', 'mse', 'mae', 'lr', 'grad_norm'} <= set(record)
    assert all(np.isfinite(record[k]) for k in ('loss', 'lr', 'grad_norm'))
  assert all('images_per_sec' in r and 'steps_per_sec' in r
             for r in train[1:])
  evals = [r for r in reference if r['split'] == 'eval']
  assert [r['step'] for r in evals] == [8, 16]
  assert evals[-1]['mse'] == final['mse']
  with open(os.path.join(reference_dir, 'eval', '16', 'metrics.json')) as f:
    assert json.load(f) == final
  assert os.listdir(os.path.join(reference_dir, 'tensorboard'))
  assert sorted(os.listdir(os.path.join(reference_dir, 'checkpoints'))) == [
      '12', '16']
  # Training must have moved the loss: the last quarter beats the first.
  losses = [r['loss'] for r in train]
  assert np.mean(losses[-4:]) < np.mean(losses[:4])

  # The trained variables load back for evaluation and score the same.
  module, variables, step, mesh = trainer.restore_variables(_config(),
                                                            reference_dir)
  assert step == TOTAL
  again = trainer_toy.evaluate(module, variables, _config(), reference_dir,
                               str(tmp_path / 'reeval'), mesh)
  assert again == final

  # Re-running a finished run does nothing.
  assert trainer.train_and_evaluate(_config(), reference_dir) == {}
  assert metrics_writer.read_records(
      os.path.join(reference_dir, 'metrics.jsonl')) == reference

  killed_dir = str(tmp_path / 'killed')
  process = subprocess.Popen(_command(killed_dir), env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  metrics_path = os.path.join(killed_dir, 'metrics.jsonl')
  _wait_for(lambda: os.path.isdir(os.path.join(killed_dir, 'checkpoints', '4'))
            and os.path.exists(metrics_path)
            and len(_train_records(killed_dir)) >= 6, process, timeout=180)
  process.send_signal(signal.SIGKILL)
  process.communicate()
  logged_before_kill = len(_train_records(killed_dir))
  assert logged_before_kill < TOTAL
  last_checkpoint = max(int(d) for d in os.listdir(
      os.path.join(killed_dir, 'checkpoints')) if d.isdigit())
  assert last_checkpoint < logged_before_kill

  resumed = subprocess.run(_command(killed_dir), env=_env(),
                           capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f'resuming from {os.path.join(killed_dir, "checkpoints")}/' \
      f'{last_checkpoint}' in resumed.stderr
  records = metrics_writer.read_records(metrics_path)
  assert [(r['step'], r['split']) for r in records] == [
      (r['step'], r['split']) for r in reference]
  for got, want in zip(records, reference):
    for key in ('loss', 'mse', 'mae', 'lr', 'grad_norm'):
      if key in want:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5,
                                   err_msg=f'step {want["step"]} {key}')
