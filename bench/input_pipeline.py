"""Input-pipeline throughput: batches/s and images/s of the runlocal AIMS training pipeline.

Generates the synthetic dataset into a temporary directory, reads it through the native readers
(as coco / entityseg / ppp / psg / paco), and times the AIMS mixture pipeline (128 px canvas,
global batch 8, one process) with 0, 1 and 2 grain worker processes:

  python -m bench.input_pipeline [--num-images 200] [--batches 60] [--warmup 5]

Worker start-up is excluded by the warm-up batches. Figures depend on the machine's free cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import ml_collections

from data_pipelines import pipeline
from data_pipelines import readers
from data_pipelines import synthetic

# The AIMS table's dataset names and the native format each is read from.
FORMATS = {"coco": "coco_panoptic", "entityseg": "coco_instances", "ppp": "pascal_panoptic_parts",
           "psg": "psg", "paco": "paco"}


def runlocal_input_config(num_workers: int) -> ml_collections.ConfigDict:
  """The runlocal input section (keys documented in data_pipelines/pipeline.py).

  Args:
    num_workers: grain worker processes.

  Returns:
    The config section.
  """
  return ml_collections.ConfigDict(dict(
      image_size=128, batch_size=8, eval_batch_size=8, scale_range=(0.5, 1.5), flip_prob=0.5,
      max_parts=32, max_entities=32, max_relations=16, class_agnostic=True, strict_maxima=False,
      mask_stride=1, sample_types=tuple(range(1, 9)), seed=0, num_workers=num_workers))


def time_pipeline(sources: dict, num_workers: int, batches: int, warmup: int) -> tuple[float, int]:
  """Times `batches` batches after `warmup` untimed ones.

  Args:
    sources: readers keyed by dataset name.
    num_workers: grain worker processes.
    batches: timed batches.
    warmup: untimed batches first (worker start-up, caches).

  Returns:
    (seconds, images in the timed batches).
  """
  p = pipeline.build_train_pipeline(runlocal_input_config(num_workers), sources, 0, 1)
  it = iter(p.dataset)
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  images = 0
  for _ in range(batches):
    images += next(it)["image"].shape[0]
  seconds = time.perf_counter() - start
  it.close()
  return seconds, images


def main() -> None:
  """Parses the arguments, builds the data and prints one line per worker count."""
  parser = argparse.ArgumentParser(prog="python -m bench.input_pipeline")
  parser.add_argument("--num-images", type=int, default=200, help="synthetic training images")
  parser.add_argument("--batches", type=int, default=60, help="timed batches per setting")
  parser.add_argument("--warmup", type=int, default=5, help="untimed batches per setting")
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="hiseg_bench_") as root:
    summary = synthetic.generate(root, args.num_images, 8, 128, 0)
    kwargs = summary["readers"]["train"]
    sources = {name: readers.build_reader(fmt, name=name, **kwargs[fmt])
               for name, fmt in FORMATS.items()}
    print(f"synthetic dataset: {args.num_images} train images at 128 px "
          f"(generated in {summary['seconds']:.1f} s); canvas 128, batch 8, one process")
    for workers in (0, 1, 2):
      seconds, images = time_pipeline(sources, workers, args.batches, args.warmup)
      print(f"workers={workers}: {args.batches / seconds:7.2f} batches/s  "
            f"{images / seconds:8.1f} images/s  ({args.batches} batches in {seconds:.2f} s)")


if __name__ == "__main__":
  main()
