"""AIMS train-step benchmark: compile time, step time, images/s and achieved GFLOP/s.

    python -m bench.train_step [--steps 8] [--warmup 2] [--r50-steps 2] [--r50-warmup 1] \
        [--r50-batch 2] [--glibc-defaults]

Two settings of configs/aims.py: `runlocal` as configured (128 px, batch 8) and `r50` at 512 px
(the paper's architecture and loss, `image_size=512`, `batch_size=--r50-batch`; nothing else
changed). The step is built exactly as training builds it (`trainer.build_training`: random
initial weights, AdamW, host Hungarian matching) and is fed real mixture batches of the AIMS
training pipeline read from a synthetic dataset generated into a temporary folder. Like every
command line of the project, the benchmark first keeps freed host memory for reuse
(`hiseg_jax/host_memory.py`); `--glibc-defaults` leaves malloc as it is, to measure what that
saves.

Per setting: compile time (lowering + XLA compilation), the median wall time of the timed steps
after the untimed warm-up steps (each step's inputs are on device before its clock starts; the
clock stops when the step's outputs are ready), images/s = batch / median step time, and the
achieved GFLOP/s = the compiled step's XLA cost-analysis flops / median step time, next to this
machine's float32 matmul GFLOP/s (a jitted 2048 x 2048 `jnp.dot`, median of 5) measured just
before the setting's timed steps, and their ratio. r50 runs fewer steps: on a 2-core CPU one of
its steps takes a minute or more and about 15 GB of memory at batch 2. XLA's flop count covers
the compiled program only (not the host matching callback) and counts a loop body once per loop.
The figures depend on the machine's free cores: a shared machine gives noisy, pessimistic
numbers.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import aims
from data_pipelines import synthetic
from hiseg_jax import host_memory
from hiseg_jax.train import sharding
from hiseg_jax.train import trainer

MATMUL_SIZE = 2048
MATMUL_REPEATS = 5
SYNTHETIC_TRAIN = 48
SYNTHETIC_VAL = 4


def matmul_gflops() -> float:
  """Measures this machine's float32 matmul throughput.

  Returns:
    GFLOP/s of a jitted [2048, 2048] x [2048, 2048] float32 `jnp.dot` (median of 5 runs after
    one warm-up run), counting 2·n³ flops.
  """
  keys = jax.random.split(jax.random.key(0))
  a = jax.random.normal(keys[0], (MATMUL_SIZE, MATMUL_SIZE), jnp.float32)  # [n, n]
  b = jax.random.normal(keys[1], (MATMUL_SIZE, MATMUL_SIZE), jnp.float32)  # [n, n]
  dot = jax.jit(jnp.dot)
  dot(a, b).block_until_ready()
  times = []
  for _ in range(MATMUL_REPEATS):
    start = time.perf_counter()
    dot(a, b).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * MATMUL_SIZE ** 3 / statistics.median(times) / 1e9


def bench_config(variant: str, data_root: str, batch_size: int) -> ml_collections.ConfigDict:
  """The config of one benchmarked setting.

  Args:
    variant: 'runlocal' (as configured) or 'r50' (at 512 px).
    data_root: the synthetic dataset to read.
    batch_size: the global batch for r50 (runlocal keeps its own).

  Returns:
    The ConfigDict.
  """
  config = aims.get_config(variant)
  config.data_root = data_root
  if variant == 'r50':
    config.image_size = 512
    config.batch_size = batch_size
  return config


def _flops(compiled: Any) -> float:
  """The flop count of a compiled program from XLA's cost analysis."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  return float(cost['flops'])


def bench_setting(name: str, config: ml_collections.ConfigDict, workdir: str, warmup: int,
                  steps: int) -> Dict[str, float]:
  """Compiles and times the training step of one config.

  Args:
    name: the setting's label.
    config: its config.
    workdir: scratch run directory.
    warmup: untimed steps after compilation.
    steps: timed steps.

  Returns:
    {'name', 'image_size', 'batch', 'compile_s', 'step_s', 'images_per_s', 'gflop_per_step',
     'gflops', 'matmul_gflops', 'ratio'}.
  """
  training = trainer.build_training(config)
  state, train_step = training.state, training.train_step
  iterator = training.spec.make_train_iterator(config, workdir)
  batch_sharding = sharding.batch_sharding(training.mesh)
  batches: List[Dict[str, jax.Array]] = [
      sharding.global_batch(next(iterator), batch_sharding, config.batch_size)
      for _ in range(warmup + steps)]

  start = time.perf_counter()
  compiled = train_step.lower(state, batches[0]).compile()
  compile_s = time.perf_counter() - start
  flops = _flops(compiled)

  # The steps call the jitted function, as training does; it finds the executable compiled
  # above in jax's cache (its first call takes ~1.5 s, not a second compilation).
  for batch in batches[:warmup]:
    state, metrics = train_step(state, batch)
  jax.block_until_ready((state, metrics))
  matmul = matmul_gflops()
  times = []
  for batch in batches[warmup:]:
    start = time.perf_counter()
    state, metrics = train_step(state, batch)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics['loss'])):
    raise FloatingPointError(f'{name}: the training loss is {float(metrics["loss"])}')
  step_s = statistics.median(times)
  gflops = flops / step_s / 1e9
  return {'name': name, 'image_size': config.image_size, 'batch': config.batch_size,
          'compile_s': compile_s, 'step_s': step_s, 'steps': steps,
          'images_per_s': config.batch_size / step_s, 'gflop_per_step': flops / 1e9,
          'gflops': gflops, 'matmul_gflops': matmul, 'ratio': gflops / matmul}


def print_table(rows: List[Dict[str, float]]) -> None:
  """Prints one line per setting.

  Args:
    rows: results of `bench_setting`.
  """
  print(f'{"setting":<10}{"px":>5}{"batch":>6}{"compile s":>11}{"step s":>14}{"img/s":>8}'
        f'{"GFLOP/step":>12}{"GFLOP/s":>9}{"matmul GFLOP/s":>16}{"ratio":>7}')
  for r in rows:
    step = f'{r["step_s"]:.3f} (n={r["steps"]})'
    print(f'{r["name"]:<10}{r["image_size"]:>5}{r["batch"]:>6}{r["compile_s"]:>11.1f}'
          f'{step:>14}{r["images_per_s"]:>8.2f}{r["gflop_per_step"]:>12.1f}{r["gflops"]:>9.2f}'
          f'{r["matmul_gflops"]:>16.1f}{r["ratio"]:>7.3f}')


def main() -> None:
  """Parses the arguments, generates the data and benchmarks both settings."""
  parser = argparse.ArgumentParser(prog='python -m bench.train_step')
  parser.add_argument('--steps', type=int, default=8, help='timed runlocal steps')
  parser.add_argument('--warmup', type=int, default=2, help='untimed runlocal steps')
  parser.add_argument('--r50-steps', type=int, default=2, help='timed r50 steps')
  parser.add_argument('--r50-warmup', type=int, default=1, help='untimed r50 steps')
  parser.add_argument('--r50-batch', type=int, default=2, help='r50 global batch')
  parser.add_argument('--glibc-defaults', action='store_true',
                      help='do not keep freed host memory (unmap large buffers after each step)')
  args = parser.parse_args()
  kept = not args.glibc_defaults and host_memory.keep_freed_memory()
  print(f'freed host memory kept for reuse: {kept}')
  print(f'jax {jax.__version__}, {jax.device_count()} {jax.devices()[0].platform} device(s)')
  rows = []
  with tempfile.TemporaryDirectory(prefix='hiseg_bench_') as root:
    summary = synthetic.generate(f'{root}/data', SYNTHETIC_TRAIN, SYNTHETIC_VAL, 128, 0)
    print(f'synthetic data: {SYNTHETIC_TRAIN} train images at 128 px '
          f'({summary["seconds"]:.1f} s)')
    for name, warmup, steps in (('runlocal', args.warmup, args.steps),
                                ('r50', args.r50_warmup, args.r50_steps)):
      config = bench_config(name, f'{root}/data', args.r50_batch)
      rows.append(bench_setting(name, config, f'{root}/{name}', warmup, steps))
      print(f'{name}: done ({rows[-1]["compile_s"]:.1f} s compile)', flush=True)
  print_table(rows)


if __name__ == '__main__':
  main()
