"""Tests for the full AIMS model: shapes, ablation switches, prompt effect, config building."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from hiseg_jax.aims.level_decoder import LevelDecoder
from hiseg_jax.aims.model import AIMSModel
from hiseg_jax.aims.model import build_aims_model

B, S = 2, 64  # batch, image size
QUERIES = (8, 6, 4)  # part, entity, relation
LAYERS = 2


def tiny_model_config(**overrides):
  """A tiny config.model (small ResNet, 1 encoder layer, 2 blocks, hidden 32)."""
  cfg = {
      'name': 'aims',
      'backbone': {'depths': (1, 1, 1, 1), 'widths': (8, 8, 8, 8), 'stem_width': 8,
                   'norm': 'frozen_bn'},
      'pixel_decoder': {'conv_dim': 32, 'mask_dim': 32, 'num_encoder_layers': 1,
                        'ffn_dim': 64, 'num_heads': 4, 'num_points': 2, 'norm_groups': 8},
      'num_queries': QUERIES, 'hidden_dim': 32, 'num_heads': 4, 'ffn_dim': 64,
      'dec_layers': LAYERS, 'pre_norm': False, 'dropout': 0.0, 'use_mpe': True,
      'use_tcm': True, 'use_am': True, 'assoc_dim': 16, 'mpe_hidden_dims': (4, 16),
      'fine_mask_levels': (), 'decoder_strides': (32, 16, 8)}
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def random_variables(model, seed=0):
  """Variables with the model's tree, filled from NumPy (avoids compiling `init`).

  Norm scales and BN variances are 1, biases and means 0, other arrays normal
  with std 1/sqrt(fan_in).
  """
  image = jnp.zeros((B, S, S, 3))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, jnp.ones((B, S, S)))
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name in ('scale', 'var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name in ('bias', 'mean'):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(fan_in), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _inputs():
  rng = np.random.default_rng(0)
  image = rng.normal(size=(B, S, S, 3)).astype(np.float32)
  full = np.ones((B, S, S), np.float32)
  partial = np.zeros((B, S, S), np.float32)
  partial[:, 8:40, 16:48] = 1.0
  return image, full, partial


@pytest.fixture(scope='module')
def full_model():
  model = build_aims_model(tiny_model_config())
  return model, random_variables(model)


def test_output_shapes_and_finiteness(full_model):
  model, variables = full_model
  image, full, _ = _inputs()
  out = jax.jit(model.apply)(variables, image, full)
  for level, q in zip(('part', 'entity', 'relation'), QUERIES):
    assert out[level]['logits'].shape == (B, q)
    assert out[level]['masks'].shape == (B, q, S // 4, S // 4)
    assert len(out[level]['aux']) == LAYERS  # the query prediction + all blocks but the last
    for aux in out[level]['aux']:
      assert aux['logits'].shape == (B, q) and aux['masks'].shape == (B, q, S // 4, S // 4)
  assert out['assoc_ep'].shape == (B, QUERIES[1], QUERIES[0])
  assert out['assoc_re'].shape == (B, QUERIES[2], QUERIES[1])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))


def test_full_model_parameter_tree(full_model):
  model, variables = full_model
  params = variables['params']
  assert set(params) == {'backbone', 'pixel_decoder', 'mpe', 'part_decoder', 'entity_decoder',
                         'relation_decoder', 'association'} | {
                             f'tcm_{i}' for i in range(LAYERS)}
  assert set(params['tcm_0']) == {'ep', 're'}
  assert set(params['association']) == {'fc_part', 'fc_entity', 'fc_relation'}
  assert params['mpe']['conv_2']['kernel'].shape == (1, 1, 16, 32)
  assert params['part_decoder']['query_feat'].shape == (QUERIES[0], 32)


@pytest.mark.parametrize('switch,absent', [('use_mpe', {'mpe'}),
                                           ('use_tcm', {f'tcm_{i}' for i in range(LAYERS)}),
                                           ('use_am', {'association'})])
def test_ablation_switch_removes_module(full_model, switch, absent):
  _, full_variables = full_model
  model = build_aims_model(tiny_model_config(**{switch: False}))
  image, full, _ = _inputs()
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, full)
  assert set(variables['params']) == set(full_variables['params']) - absent
  out = jax.eval_shape(model.apply, variables, image, full)
  has_assoc = switch != 'use_am'
  assert ('assoc_ep' in out) == has_assoc and ('assoc_re' in out) == has_assoc


def test_prompt_changes_outputs_only_with_mpe(full_model):
  image, full, partial = _inputs()
  model, variables = full_model
  apply = jax.jit(model.apply)
  a, b = apply(variables, image, full), apply(variables, image, partial)
  assert np.abs(np.asarray(a['entity']['masks']) - np.asarray(b['entity']['masks'])).max() > 1e-3
  plain = build_aims_model(tiny_model_config(use_mpe=False, use_tcm=False, use_am=False))
  plain_vars = random_variables(plain)
  plain_apply = jax.jit(plain.apply)
  a, b = plain_apply(plain_vars, image, full), plain_apply(plain_vars, image, partial)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_build_rejects_unknown_and_missing_keys():
  cfg = tiny_model_config()
  cfg.num_querys = 3
  with pytest.raises(ValueError, match='num_querys'):
    build_aims_model(cfg)
  cfg = tiny_model_config()
  cfg.backbone.depth = 3
  with pytest.raises(ValueError, match='config.model.backbone'):
    build_aims_model(cfg)


def test_model_rejects_bad_inputs(full_model):
  model, variables = full_model
  image, full, _ = _inputs()
  with pytest.raises(ValueError, match='prompt_mask shape'):
    jax.eval_shape(model.apply, variables, image, full[:, :32])
  with pytest.raises(ValueError, match='divisible by 32'):
    jax.eval_shape(model.apply, variables, image[:, :48], None)


def test_num_queries_int_is_shared_by_levels():
  model = build_aims_model(tiny_model_config(num_queries=5))
  assert isinstance(model, AIMSModel) and model.num_queries == (5, 5, 5)


def test_fine_mask_levels_decode_on_stride_2_features():
  model = build_aims_model(tiny_model_config(fine_mask_levels=('part',)))
  variables = random_variables(model)
  assert {'stem_lateral_conv', 'stem_lateral_norm', 'fine_mask_features'} <= set(
      variables['params']['pixel_decoder'])
  image, full, partial = _inputs()
  apply = jax.jit(model.apply)
  out, prompted = apply(variables, image, full), apply(variables, image, partial)
  for level, q in zip(('part', 'entity', 'relation'), QUERIES):
    side = S // 2 if level == 'part' else S // 4
    assert out[level]['masks'].shape == (B, q, side, side)
    assert all(aux['masks'].shape == (B, q, side, side) for aux in out[level]['aux'])
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
  # MPE's M_2 reaches the stride-2 features: the prompt still changes the part masks.
  change = np.asarray(out['part']['masks']) - np.asarray(prompted['part']['masks'])
  assert np.abs(change).max() > 1e-3


def test_fine_mask_levels_are_checked():
  with pytest.raises(ValueError, match="fine_mask_levels \\['parts'\\] are not in"):
    model = build_aims_model(tiny_model_config(fine_mask_levels=('parts',)))
    jax.eval_shape(model.init, jax.random.PRNGKey(0), *_inputs()[:2])
  model = build_aims_model(tiny_model_config(fine_mask_levels=('part',)))
  with pytest.raises(ValueError, match='stride-2 mask features exactly when non-empty'):
    jax.eval_shape(model.clone(fine_mask_levels=()).init, jax.random.PRNGKey(0),
                   *_inputs()[:2])


@pytest.mark.parametrize('strides', [(32, 16, 8), (16, 8, 4)])
def test_decoder_strides_choose_the_attended_maps(strides):
  model = build_aims_model(tiny_model_config(decoder_strides=strides))
  image, full, _ = _inputs()
  seen = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, LevelDecoder) and context.method_name == 'memory':
      seen.append(out.sizes)
    return out

  with nn.intercept_methods(record):
    variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), image, full)
  expected = [(S // s, S // s) for s in strides]
  assert seen == [expected] * 3  # part, entity, relation decoders
  # The attended maps are looked up by stride: the parameter tree does not depend on them.
  default = jax.eval_shape(build_aims_model(tiny_model_config()).init, jax.random.PRNGKey(0),
                           image, full)
  assert jax.tree.structure(variables) == jax.tree.structure(default)


@pytest.mark.parametrize('strides', [(8, 16, 32), (32, 16, 2), (), (16, 16, 8)])
def test_decoder_strides_are_checked(strides):
  model = build_aims_model(tiny_model_config(decoder_strides=strides))
  with pytest.raises(ValueError, match='decoder_strides'):
    jax.eval_shape(model.init, jax.random.PRNGKey(0), *_inputs()[:2])
