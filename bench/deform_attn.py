"""Benchmark: our deformable-attention core against PyTorch's reference formulation.

Shape: the pixel-decoder encoder of a 512 px image: batch 2, levels 64x64, 32x32,
16x16, 8x8 (5,440 queries, one per position), 8 heads x 32 channels, 4 points.
Times `ms_deform_attn_core` (jit) and `ms_deform_attn_core_pytorch` (torch
grid_sample, torch on --torch-threads threads) in the same run, forward and
forward+backward, best of --repeats, and prints the ratios. Also prints the
largest output difference so the two are known to compute the same thing.

Usage (from the repository root): python -m bench.deform_attn [--repeats 5] [--torch-threads 2]
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from hiseg_jax.layers.deformable_attention import ms_deform_attn_core
from tests.torch_references import torch_ms_deform_attn_core

SHAPES = ((64, 64), (32, 32), (16, 16), (8, 8))
BATCH, HEADS, HEAD_DIM, POINTS = 2, 8, 32, 4


def best_of_interleaved(fns, repeats):
  """Best wall time of each callable, timed in interleaved rounds.

  Interleaving gives every candidate the same share of a busy machine.

  Args:
    fns: dict name -> zero-argument callable that blocks until its result is ready.
    repeats: number of timed rounds (after one warm-up call of each).

  Returns:
    (dict name -> best seconds, dict name -> result of the warm-up call).
  """
  results = {name: fn() for name, fn in fns.items()}
  best = {name: float('inf') for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - start)
  return best, results


def main():
  """Runs the benchmark and prints the figures."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--torch-threads', type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.torch_threads)

  rng = np.random.default_rng(0)
  s = sum(h * w for h, w in SHAPES)
  value = rng.normal(size=(BATCH, s, HEADS, HEAD_DIM)).astype(np.float32)
  locations = rng.uniform(-0.05, 1.05, size=(BATCH, s, HEADS, len(SHAPES), POINTS, 2))
  locations = locations.astype(np.float32)
  weights = rng.uniform(size=(BATCH, s, HEADS, len(SHAPES), POINTS)).astype(np.float32)
  weights /= weights.sum(axis=(-2, -1), keepdims=True)
  cot = rng.normal(size=(BATCH, s, HEADS * HEAD_DIM)).astype(np.float32)

  tv, tl, tw = [torch.from_numpy(x).requires_grad_() for x in (value, locations, weights)]
  tcot = torch.from_numpy(cot)

  def torch_fwd():
    with torch.no_grad():
      return torch_ms_deform_attn_core(tv, SHAPES, tl, tw)

  def torch_fwd_bwd():
    for t in (tv, tl, tw):
      t.grad = None
    (torch_ms_deform_attn_core(tv, SHAPES, tl, tw) * tcot).sum().backward()
    return [t.grad for t in (tv, tl, tw)]

  jv, jl, jw, jcot = [jnp.asarray(x) for x in (value, locations, weights, cot)]
  fwd = jax.jit(lambda v, l, w: ms_deform_attn_core(v, SHAPES, l, w))
  fwd_bwd = jax.jit(jax.grad(lambda v, l, w: (ms_deform_attn_core(v, SHAPES, l, w) * jcot).sum(),
                             argnums=(0, 1, 2)))

  best, results = best_of_interleaved({
      'ref_f': torch_fwd,
      'ref_fb': torch_fwd_bwd,
      'jax_f': lambda: jax.block_until_ready(fwd(jv, jl, jw)),
      'jax_fb': lambda: jax.block_until_ready(fwd_bwd(jv, jl, jw)),
  }, args.repeats)
  t_ref_f, t_ref_fb, t_jax_f, t_jax_fb = (best[k] for k in ('ref_f', 'ref_fb', 'jax_f', 'jax_fb'))
  ref_out, ref_grads, out, grads = (results[k] for k in ('ref_f', 'ref_fb', 'jax_f', 'jax_fb'))

  out_err = float(np.abs(np.asarray(out) - ref_out.numpy()).max())
  grad_err = [float(np.abs(np.asarray(g) - r.numpy()).max() / np.abs(r.numpy()).max())
              for g, r in zip(grads, ref_grads)]
  print(f'deformable attention core: batch {BATCH}, {s} queries, levels {SHAPES}, '
        f'{HEADS} heads x {HEAD_DIM} ch, {POINTS} points')
  print(f'jax {jax.__version__} on {jax.devices()[0].platform}; torch {torch.__version__} '
        f'on {torch.get_num_threads()} threads; best of {args.repeats}')
  print(f'{"":16s}{"reference (s)":>15s}{"ours (s)":>12s}{"speed-up":>10s}')
  print(f'{"forward":16s}{t_ref_f:15.3f}{t_jax_f:12.3f}{t_ref_f / t_jax_f:9.2f}x')
  print(f'{"forward+backward":16s}{t_ref_fb:15.3f}{t_jax_fb:12.3f}{t_ref_fb / t_jax_fb:9.2f}x')
  print(f'max |out - ref| = {out_err:.2e}; max relative grad error (value, locations, weights) = '
        + ', '.join(f'{e:.1e}' for e in grad_err))


if __name__ == '__main__':
  main()
