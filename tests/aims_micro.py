"""The smallest AIMS config that still has every module: the runlocal config shrunk for tests."""

import ml_collections

from configs import aims


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """configs/aims.py:runlocal at 64 px (evaluated at 96) with one decoder block and a few queries.

  Args:
    arg: unused (the `--config path:arg` convention).

  Returns:
    The ConfigDict.
  """
  del arg
  config = aims.get_config('runlocal')
  config.image_size = 64
  config.synthetic.update({'num_train': 16, 'num_val': 4, 'image_size': 64})
  config.model.backbone.update({'widths': (8, 8, 16, 16), 'stem_width': 8})
  config.model.pixel_decoder.update({'conv_dim': 32, 'mask_dim': 32, 'num_encoder_layers': 1,
                                     'ffn_dim': 64, 'num_heads': 2, 'norm_groups': 4})
  config.model.update({'num_queries': (6, 5, 4), 'hidden_dim': 32, 'num_heads': 2,
                       'ffn_dim': 64, 'dec_layers': 1, 'assoc_dim': 16})
  config.loss.match_num_points = 128
  # Evaluated on a larger canvas than trained on, as runlocal does.
  config.eval.image_size = 96
  config.input.update({'eval_batch_size': 4, 'max_parts': 8, 'max_entities': 8,
                       'max_relations': 6})
  config.batch_size = 8
  config.total_steps = 4
  config.log_every = 1
  config.checkpoint_every = 2
  config.eval_every = 0
  config.optim.warmup_steps = 2
  config.optim.decay_steps = (3,)
  return config
