"""HIPIE configs: `configs/hipie.py:r50` (the reference model) and `configs/hipie.py:runlocal`.

    python -m hiseg_jax.main --config configs/hipie.py:runlocal --workdir W

`runlocal` trains every HIPIE module (ResNet, BERT, the fusion block, the fused deformable
encoder, the DINO thing decoder with CondInst masks, the MaskDINO stuff branch) at small sizes on
the synthetic dataset the trainer generates into `W/data/synthetic`, with the batch mixture of the
reference's hierarchical stage (panoptic, referring and "object part" samples; reference ratio
pascal_parts : coco : refcoco = 3 : 1 : 1), and evaluates PQ, mask / box AP and mIoU (panoptic
pass), referring oIoU (referring pass) and part mIoU (part pass) on the synthetic validation
split. `r50` is the reference model (ResNet-50, bert-base-uncased, 900 + 300 queries) with its
optimiser settings; point `data_root` (or each `datasets.<name>.root`), `text.vocab` (a BERT
vocab.txt), `text.weights` (the BERT checkpoint directory) and `vocabularies.<name>` (a categories
JSON) at real data to train on it.
"""

import ml_collections

from data_pipelines import dataset_config
from hiseg_jax import config_validation
from hiseg_jax.hipie.model import model_config
from hiseg_jax.losses.hipie_loss import default_hipie_loss_config

# Training datasets -> (reader format of the synthetic layout, task, mixture ratio).
_TRAIN = {
    "coco": ("coco_panoptic", "panoptic", 1.0),
    "refcoco": ("refcoco", "referring", 1.0),
    "ppp": ("pascal_panoptic_parts", "part", 1.0),
}
# Evaluation pass -> (dataset name, reader format).
_EVAL = {
    "panoptic": ("coco_val", "coco_panoptic"),
    "referring": ("refcoco_val", "refcoco"),
    "part": ("ppp_val", "pascal_panoptic_parts"),
}


def get_config(arg: str = "runlocal") -> ml_collections.ConfigDict:
  """Returns the HIPIE config of a variant.

  Args:
    arg: "runlocal" or "r50".

  Returns:
    The ConfigDict (trainer keys from `config_validation.base_config` plus the HIPIE sections).

  Raises:
    ValueError: for an unknown variant.
  """
  if arg not in ("runlocal", "r50"):
    raise ValueError(f"configs/hipie.py: unknown variant {arg!r}; use 'runlocal' or 'r50'")
  runlocal = arg == "runlocal"
  config = config_validation.base_config()

  config.image_size = 128 if runlocal else 1024
  # '' generates the synthetic default into W/data/synthetic; a path uses data in that layout.
  config.data_root = ""
  config.synthetic = ml_collections.ConfigDict({
      "num_train": 1000, "num_val": 100, "image_size": 128, "seed": 0})

  config.datasets = ml_collections.ConfigDict()
  config.vocabularies = ml_collections.ConfigDict()
  for name, (fmt, task, _) in _TRAIN.items():
    config.datasets[name] = dataset_config.synthetic_entry(fmt, "train")
    if task != "referring":
      config.vocabularies[name] = "synthetic"
  for task, (name, fmt) in _EVAL.items():
    config.datasets[name] = dataset_config.synthetic_entry(fmt, "val")
    if task != "referring":
      config.vocabularies[name] = "synthetic"
  # vocab: '' = the synthetic dataset's whole-word vocabulary, else a BERT vocab.txt; weights: ''
  # = random initialisation, else a Hugging Face BERT directory (bert-base-uncased for r50).
  config.text = ml_collections.ConfigDict({"vocab": "", "weights": ""})

  config.model = model_config("runlocal" if runlocal else "r50")
  config.model.name = "hipie"
  if runlocal:
    # The synthetic vocabulary has ~60 words; the embedding table needs no 30,522 rows.
    config.model.text_encoder.vocab_size = 256
    # One denoising group over the 24 target slots (max_things + max_stuff) in both decoders
    # (groups = budget // slots, as DINO / MaskDINO with the padded slot count).
    config.model.things.dn_number = 24
    config.model.stuff.dn_num = 24

  config.loss = ml_collections.ConfigDict(default_hipie_loss_config())
  if runlocal:
    for part in ("thing", "stuff"):
      config.loss[part].num_points = 256
    config.loss.stuff.match_num_points = 256

  config.input = ml_collections.ConfigDict({
      "eval_batch_size": 8,
      "scale_range": (0.75, 1.25) if runlocal else (0.1, 2.0),
      "flip_prob": 0.5,
      "max_things": 16 if runlocal else 100,
      "max_stuff": 8 if runlocal else 50,
      "max_classes": 32 if runlocal else 1024,
      "max_text_len": 96 if runlocal else 1024,
      "strict_maxima": False,
      "prompt": "sampled",
      "max_negatives": 85,
      "part_object_tokens": True,
      "task_group_size": 2,
      "mixture": {name: {"task": task, "ratio": ratio}
                  for name, (_, task, ratio) in _TRAIN.items()},
      "num_workers": 0,
  })
  if not runlocal:
    config.input.mixture.ppp.ratio = 3.0

  config.eval = ml_collections.ConfigDict({name: value for name, (value, _) in _EVAL.items()})
  config.eval.update({
      "top_k": 100,
      "nms_threshold": 0.7,
      "temperature": 0.06,
      "object_mask_threshold": 0.25,
      "overlap_threshold": 0.8,
  })

  config.optim.weight_decay = 0.01
  config.optim.clip_norm = 0.1
  config.batch_size = 8 if runlocal else 32
  if runlocal:
    config.total_steps = 1500
    config.log_every = 50
    config.eval_every = 0
    config.checkpoint_every = 500
    config.optim.lr = 3e-4
    config.optim.warmup_steps = 100
    config.optim.decay_steps = (1200, 1400)
    # Random initialisation offline: the backbone and the text encoder train at the full rate
    # (the reference's x0.1 fine-tunes pretrained ones).
    config.optim.lr_multipliers.backbone = 1.0
  else:
    # Stage III of HIPIE Table A2: 150k iterations, x0.1 at 100k and 135k.
    config.total_steps = 150000
    config.eval_every = 10000
    config.checkpoint_every = 5000
    config.optim.lr = 1e-4
    config.optim.warmup_steps = 2000
    config.optim.decay_steps = (100000, 135000)
    config.optim.lr_multipliers.text_encoder = 0.1
  return config
