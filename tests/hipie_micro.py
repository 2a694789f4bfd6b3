"""The smallest HIPIE config with every module: configs/hipie.py:runlocal shrunk for tests."""

import ml_collections

from configs import hipie


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  """configs/hipie.py:runlocal at 64 px with one layer per stack and a few queries.

  Args:
    arg: unused (the `--config path:arg` convention).

  Returns:
    The ConfigDict.
  """
  del arg
  config = hipie.get_config('runlocal')
  config.image_size = 64
  config.synthetic.update({'num_train': 8, 'num_val': 4, 'image_size': 64})
  model = config.model
  model.backbone.update({'widths': (8, 8, 16, 16), 'stem_width': 8})
  model.text_encoder.update({'vocab_size': 64, 'hidden_size': 32, 'intermediate_size': 64,
                             'num_hidden_layers': 1, 'num_attention_heads': 2})
  model.fusion.update({'embed_dim': 32, 'num_heads': 2})
  # 10 target slots (max_things + max_stuff): two denoising groups in both decoders.
  model.things.update({'d_model': 32, 'ffn_dim': 64, 'num_heads': 2, 'num_encoder_layers': 1,
                       'num_decoder_layers': 1, 'num_queries': 10, 'num_bg_queries': 2,
                       'dn_number': 20, 'norm_groups': 4})
  model.stuff.update({'hidden_dim': 32, 'mask_dim': 32, 'num_heads': 2, 'encoder_ffn_dim': 64,
                      'decoder_ffn_dim': 64, 'num_encoder_layers': 1, 'num_decoder_layers': 1,
                      'num_queries': 8, 'dn_num': 20, 'norm_groups': 4})
  for part in ('thing', 'stuff'):
    config.loss[part].num_points = 64
  config.loss.stuff.match_num_points = 64
  # The part prompt of the synthetic vocabulary is 71 tokens.
  config.input.update({'eval_batch_size': 4, 'max_things': 6, 'max_stuff': 4,
                       'max_text_len': 80, 'max_negatives': 8})
  config.batch_size = 4
  config.total_steps = 4
  config.log_every = 1
  config.checkpoint_every = 2
  config.eval_every = 0
  config.optim.warmup_steps = 2
  config.optim.decay_steps = (3,)
  return config
