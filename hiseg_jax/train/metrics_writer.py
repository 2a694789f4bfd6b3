"""Training and evaluation metrics: `W/metrics.jsonl` and TensorBoard events.

`metrics.jsonl` holds one JSON object per line: training records
`{"step", "split": "train", "loss", <per-term losses>, "lr", "grad_norm",
"images_per_sec", "steps_per_sec"}` and evaluation records
`{"step", "split": "eval", <metrics>}`. Non-finite values are written as
null. When a run resumes from a checkpoint at step s, records with a step
above s (written by the interrupted run after its last checkpoint) are dropped
first, so the file reads like one uninterrupted run; TensorBoard is told to
purge events after s in the same way. Only process 0 writes.
"""

import json
import math
import os
from typing import Dict, List, Mapping

import tensorboardX

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


def read_records(path: str) -> List[Dict[str, object]]:
  """Reads a metrics.jsonl file.

  Args:
    path: the file.

  Returns:
    The records in file order.

  Raises:
    ValueError: naming the file and line of a malformed record.
  """
  records = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f'{path}:{number}: not a JSON record: {e}') from e
  return records


def _jsonable(value: object) -> object:
  """A float for numbers (None when not finite), the value otherwise."""
  if isinstance(value, str):
    return value
  number = float(value)
  return number if math.isfinite(number) else None


class MetricsWriter:
  """Appends metric records to metrics.jsonl and TensorBoard.

  Attributes:
    path: the metrics.jsonl path.
  """

  def __init__(self, workdir: str, resume_step: int, enabled: bool):
    """Opens the writers, dropping records after `resume_step`.

    Args:
      workdir: the run's work directory.
      resume_step: the step training resumes from (0 for a fresh run).
      enabled: False on every process but 0 (then nothing is written).
    """
    self.path = os.path.join(workdir, METRICS_FILE)
    self._enabled = enabled
    self._eval_steps = set()
    self._file = None
    self._tensorboard = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    if os.path.exists(self.path):
      kept = [r for r in read_records(self.path) if r['step'] <= resume_step]
      tmp_path = self.path + '.tmp'
      with open(tmp_path, 'w') as f:
        for record in kept:
          f.write(json.dumps(record) + '\n')
      os.replace(tmp_path, self.path)
      self._eval_steps = {r['step'] for r in kept if r.get('split') == 'eval'}
    self._file = open(self.path, 'a')
    self._tensorboard = tensorboardX.SummaryWriter(
        os.path.join(workdir, TENSORBOARD_DIR),
        purge_step=resume_step + 1)

  def has_eval(self, step: int) -> bool:
    """Whether an evaluation record for `step` is already in the file.

    Args:
      step: a training step.

    Returns:
      True if evaluated (always False on processes other than 0).
    """
    return step in self._eval_steps

  def _write(self, step: int, split: str, metrics: Mapping[str, object]) -> None:
    """Writes one record to both sinks."""
    if not self._enabled:
      return
    record = {'step': int(step), 'split': split}
    record.update({k: _jsonable(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + '\n')
    self._file.flush()
    for name, value in record.items():
      if name not in ('step', 'split') and isinstance(value, float):
        self._tensorboard.add_scalar(f'{split}/{name}', value, int(step))
    self._tensorboard.flush()

  def write_train(self, step: int, metrics: Mapping[str, float]) -> None:
    """Writes a training record.

    Args:
      step: the number of completed steps.
      metrics: scalar metrics (loss, per-term losses, lr, grad_norm, ...).
    """
    self._write(step, 'train', metrics)

  def write_eval(self, step: int, metrics: Mapping[str, object]) -> None:
    """Writes an evaluation record.

    Args:
      step: the step whose parameters were evaluated.
      metrics: the evaluation's metrics.
    """
    self._write(step, 'eval', metrics)
    self._eval_steps.add(int(step))

  def close(self) -> None:
    """Flushes and closes both sinks."""
    if self._file is not None:
      self._file.close()
      self._tensorboard.close()
