"""SIGTERM: the main command saves a final checkpoint and exits 0."""

import os
import signal
import subprocess
import sys
import time

from hiseg_jax.train import metrics_writer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / 'run')
  command = [sys.executable, '-m', 'hiseg_jax.main', '--config',
             os.path.join(REPO, 'tests', 'trainer_toy.py'), '--workdir',
             workdir, '--config.total_steps=100000',
             '--config.checkpoint_every=100000', '--config.eval_every=0',
             '--config.log_every=1', '--config.data.delay_s=0.1']
  process = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=REPO),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  deadline = time.time() + 180
  while not (os.path.exists(metrics_path)
             and len(metrics_writer.read_records(metrics_path)) >= 3):
    assert process.poll() is None, process.communicate()[1][-3000:]
    assert time.time() < deadline, 'no training steps logged in 180 s'
    time.sleep(0.05)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=180)
  assert process.returncode == 0, stderr[-3000:]
  assert 'preemption notice: saving step' in stderr

  records = metrics_writer.read_records(metrics_path)
  last_step = records[-1]['step']
  assert 3 <= last_step < 100000
  checkpoints = os.path.join(workdir, 'checkpoints')
  assert os.listdir(checkpoints) == [str(last_step)]
  saved = os.path.join(checkpoints, str(last_step))
  assert sorted(os.listdir(os.path.join(saved, 'data'))) == [
      'commit_success.txt', 'process_0-of-1.json']
  assert os.path.exists(os.path.join(saved, 'state', 'manifest.ocdbt'))
