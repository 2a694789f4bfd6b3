"""A toy model and grain pipeline for the trainer tests, and its config.

Importing this module registers the model `trainer_toy`; it is also a config
file for `python -m hiseg_jax.main --config tests/trainer_toy.py` (loading it
registers the model in that process). The model regresses a target computed
from a random image and a task id with a tiny conv net whose parameters cover
every optimiser case: a `backbone` group, a LayerNorm, biases, an embedding,
dropout, and a non-parameter collection carried as model state.
"""

import functools
import json
import os
import time

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from hiseg_jax import config_validation
from hiseg_jax import registry

NAME = 'trainer_toy'
NUM_TASKS = 4
EVAL_OFFSET = 10_000
EVAL_SIZE = 16


class ToyBackbone(nn.Module):
  """Conv + LayerNorm + ReLU at stride 2."""

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """Args: x [B, H, W, 3] float. Returns: [B, H/2, W/2, 8]."""
    x = nn.Conv(8, (3, 3), strides=2, name='conv')(x)  # [B, H/2, W/2, 8]
    x = nn.LayerNorm(name='norm')(x)  # [B, H/2, W/2, 8]
    return nn.relu(x)  # [B, H/2, W/2, 8]


class ToyNet(nn.Module):
  """Predicts one number per image from the image and its task id.

  Attributes:
    dropout: dropout rate on the pooled features.
  """
  dropout: float

  @nn.compact
  def __call__(self, image: jnp.ndarray, task: jnp.ndarray,
               train: bool = False) -> jnp.ndarray:
    """Args: image uint8 [B, H, W, 3], task int [B]. Returns: [B]."""
    mean = self.variable('frozen_stats', 'mean',
                         lambda: jnp.full((3,), 127.5, jnp.float32))
    x = (image.astype(jnp.float32) - mean.value) / 64.0  # [B, H, W, 3]
    x = ToyBackbone(name='backbone')(x)  # [B, H/2, W/2, 8]
    x = x.mean(axis=(1, 2))  # [B, 8]
    x = x + nn.Embed(NUM_TASKS, 8, name='task_embed')(task)  # [B, 8]
    x = nn.Dropout(self.dropout, deterministic=not train)(x)  # [B, 8]
    return nn.Dense(1, name='head')(x)[:, 0]  # [B]


def example(index: int, image_size: int) -> dict:
  """One deterministic example.

  Args:
    index: the example's index (its seed).
    image_size: square image side.

  Returns:
    {'image': uint8 [S, S, 3], 'task': int32 [], 'target': float32 []}.
  """
  rng = np.random.default_rng(int(index))
  image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
  task = np.int32(index % NUM_TASKS)
  target = np.float32(image[..., 0].mean() / 255.0 + 0.25 * task)
  return {'image': image, 'task': task, 'target': target}


def _slow(batch: dict, delay_s: float) -> dict:
  """Sleeps `delay_s` per batch (a slow input pipeline for the kill tests)."""
  time.sleep(delay_s)
  return batch


def build(config: ml_collections.ConfigDict) -> nn.Module:
  """Returns the toy module."""
  return ToyNet(dropout=config.model.dropout)


def init_inputs(config: ml_collections.ConfigDict) -> dict:
  """Returns example inputs for module.init."""
  size = config.data.image_size
  return {'image': np.zeros((1, size, size, 3), np.uint8),
          'task': np.zeros((1,), np.int32), 'train': False}


def loss_fn(module, variables, batch, rng, config, train):
  """Mean squared error plus a small absolute-error term."""
  del config
  pred = module.apply(variables, batch['image'], batch['task'], train=train,
                      rngs={'dropout': rng})  # [B]
  err = pred - batch['target']  # [B]
  mse = jnp.mean(err ** 2)
  mae = jnp.mean(jnp.abs(err))
  return mse + 0.1 * mae, {'mse': mse, 'mae': mae}


def make_train_iterator(config, workdir):
  """The toy grain pipeline: shuffled, repeated, this process's batches."""
  del workdir
  local_batch = config.batch_size // jax.process_count()
  dataset = (grain.MapDataset.range(config.data.num_examples)
             .shuffle(seed=config.seed)
             .repeat())
  dataset = dataset[jax.process_index()::jax.process_count()]
  dataset = dataset.map(functools.partial(
      example, image_size=config.data.image_size))
  batches = dataset.to_iter_dataset().batch(local_batch)
  if config.data.delay_s:
    # Mapped after batching, so it runs in the training loop's thread.
    batches = batches.map(functools.partial(_slow,
                                            delay_s=config.data.delay_s))
  return iter(batches)


def evaluate(module, variables, config, workdir, out_dir, mesh):
  """MSE on a fixed held-out set, also written to `out_dir`/metrics.json."""
  del workdir, mesh
  examples = [example(EVAL_OFFSET + i, config.data.image_size)
              for i in range(EVAL_SIZE)]
  image = np.stack([e['image'] for e in examples])  # [N, S, S, 3]
  task = np.stack([e['task'] for e in examples])  # [N]
  target = np.stack([e['target'] for e in examples])  # [N]
  pred = jax.jit(module.apply)(variables, image, task)  # [N]
  metrics = {'mse': float(np.mean((np.asarray(pred) - target) ** 2))}
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(metrics, f)
  return metrics


SPEC = registry.ModelSpec(
    build=build, init_inputs=init_inputs, loss_fn=loss_fn,
    make_train_iterator=make_train_iterator, evaluate=evaluate,
    config_sections=('model', 'data'))

if NAME not in registry.names():
  registry.register(NAME, SPEC)


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """The toy run's config.

  Args:
    arg: unused variant name.

  Returns:
    A ConfigDict with the trainer keys and the toy's model/data sections.
  """
  del arg
  config = config_validation.base_config()
  config.model = ml_collections.ConfigDict({'name': NAME, 'dropout': 0.1})
  config.data = ml_collections.ConfigDict(
      {'num_examples': 64, 'image_size': 16, 'delay_s': 0.0})
  config.seed = 3
  config.batch_size = 8
  config.total_steps = 12
  config.log_every = 1
  config.eval_every = 6
  config.checkpoint_every = 4
  config.keep_checkpoints = 2
  config.fsdp_min_size = 16
  config.optim.lr = 1e-2
  config.optim.warmup_steps = 2
  config.optim.decay_steps = (8,)
  config.optim.clip_norm = 1.0
  return config
