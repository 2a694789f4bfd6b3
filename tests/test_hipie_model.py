"""Tests for hiseg_jax.hipie.model: assembly, output contract, parameter groups, config checks."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fast_compile import fast_compile
from hiseg_jax.hipie.model import HIPIEModel
from hiseg_jax.hipie.model import build_hipie_model
from hiseg_jax.hipie.model import model_config

B, SIZE, T, N = 2, 64, 12, 3
Q_THING, Q_BG, Q_STUFF, DN = 20, 2, 10, 6


def _tiny_config() -> ml_collections.ConfigDict:
  config = model_config('runlocal')
  config.text_encoder.vocab_size = 100
  config.text_encoder.hidden_size = 32
  config.text_encoder.intermediate_size = 64
  config.text_encoder.num_hidden_layers = 1
  config.fusion.embed_dim = 64
  config.things.update(d_model=32, ffn_dim=64, num_encoder_layers=1, num_queries=Q_THING,
                       num_bg_queries=Q_BG, dn_number=DN)
  config.stuff.update(hidden_dim=32, mask_dim=32, num_encoder_layers=1, encoder_ffn_dim=64,
                      decoder_ffn_dim=64, num_queries=Q_STUFF, num_decoder_layers=2, dn_num=DN)
  return config


def _inputs():
  rng = np.random.default_rng(0)
  image = jnp.asarray(rng.normal(size=(B, SIZE, SIZE, 3)), jnp.float32)
  ids = jnp.asarray(rng.integers(1, 100, size=(B, T)), jnp.int32)
  mask = jnp.asarray(np.arange(T)[None] < np.array([[T], [7]]), jnp.int32)
  centres = rng.uniform(0.3, 0.7, size=(B, N, 2))
  sides = rng.uniform(0.1, 0.3, size=(B, N, 2))
  dn = {'boxes': jnp.asarray(np.concatenate([centres, sides], -1), jnp.float32),
        'valid': jnp.asarray([[True, True, False], [True, False, False]])}
  sizes = jnp.asarray([[64, 64], [48, 56]], jnp.int32)
  return image, ids, mask, dn, sizes


def _random_variables(shapes, seed=0, scale=0.1):
  """Random weights for every leaf (norm scales and BN variances around 1), without compiling
  the initialiser: N(0, scale) everywhere, plus 1 on 'scale' / 'var' leaves."""
  rng = np.random.default_rng(seed)

  def leaf(path, x):
    name = jax.tree_util.keystr(path)
    base = 1.0 if ("'scale'" in name or "'var'" in name) else 0.0
    noise = rng.normal(size=x.shape) * (0.0 if "'var'" in name else scale)
    return jnp.asarray(base + noise, x.dtype)

  return jax.tree_util.tree_map_with_path(leaf, shapes)


@pytest.fixture(scope='module')
def model_and_variables():
  model = build_hipie_model(_tiny_config())
  image, ids, mask, _, _ = _inputs()
  shapes = jax.eval_shape(model.init, {'params': jax.random.key(0), 'dropout': jax.random.key(1)},
                          image, ids, mask)
  return model, _random_variables(shapes)


def test_parameter_groups_are_top_level_modules(model_and_variables):
  model, variables = model_and_variables
  params = variables['params']
  assert set(params) == {'backbone', 'text_encoder', 'fusion', 'thing_encoder', 'thing_decoder',
                         'stuff_decoder'}
  assert 'fusion' not in params['thing_encoder']  # the shared block lives at the top only
  assert set(params['fusion']) == {'layer_norm_v', 'layer_norm_l', 'gamma_v', 'gamma_l', 'attn'}
  assert params['fusion']['gamma_l'].shape == (32,)  # text width follows BERT's hidden size
  assert set(variables['batch_stats']) == {'backbone'}
  fusion = jax.jit(model.fusion.init)(jax.random.key(0), jnp.zeros((1, 4, 32)),
                                      jnp.zeros((1, 3, 32)), jnp.ones((1, 3), bool))
  np.testing.assert_allclose(np.asarray(fusion['params']['gamma_v']), 1.0)  # 1 / encoder layers


def test_train_forward_shapes_finite_and_gradients_reach_every_group(model_and_variables):
  model, variables = model_and_variables
  image, ids, mask, dn, sizes = _inputs()

  def loss(params):
    out = model.apply({**variables, 'params': params}, image, ids, mask, dn, sizes, train=True,
                      rngs={'dropout': jax.random.key(2)})
    terms = [out['things']['logits'], out['things']['boxes'], out['things']['masks'],
             out['stuff']['logits'], out['stuff']['masks'], out['stuff']['dn']['boxes']]
    total = sum(jnp.where(jnp.abs(x) < 1e4, x, 0.0).sum() for x in terms)
    return total, out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])
  things, stuff = out['things'], out['stuff']
  groups = 2 * (DN // N)
  assert things['logits'].shape == (B, Q_THING, T) and things['boxes'].shape == (B, Q_THING, 4)
  assert things['masks'].shape == (B, Q_THING, SIZE // 4, SIZE // 4)
  assert things['aux'][0]['masks'].shape == (B, Q_THING, SIZE // 4, SIZE // 4)
  assert things['dn']['logits'].shape == (B, groups * N, T)
  assert things['bg']['boxes'].shape == (B, Q_BG, 4) and things['text'].shape == (B, T, 32)
  assert stuff['logits'].shape == (B, Q_STUFF, T)
  assert stuff['masks'].shape == (B, Q_STUFF, SIZE // 4, SIZE // 4)
  assert len(stuff['aux']) == 2 and stuff['dn']['logits'].shape == (B, (DN // N) * N, T)
  for path, x in jax.tree_util.tree_leaves_with_path(out):
    if jnp.issubdtype(x.dtype, jnp.floating):
      assert np.isfinite(np.asarray(x)).all(), jax.tree_util.keystr(path)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert np.isfinite(np.asarray(g)).all(), jax.tree_util.keystr(path)
  for group in ('backbone', 'text_encoder', 'fusion', 'thing_encoder', 'thing_decoder',
                'stuff_decoder'):
    assert sum(np.abs(np.asarray(g)).sum() for g in jax.tree.leaves(grads[group])) > 0, group
  # Padded text tokens of image 1 carry the padded-token logit in both decoders.
  assert (np.asarray(things['logits'])[1, :, 7:] == -5e4).all()
  assert (np.asarray(stuff['logits'])[1, :, 7:] == -5e4).all()


def test_eval_forward_shapes_and_grounding(model_and_variables):
  model, variables = model_and_variables
  image, ids, mask, dn, sizes = _inputs()
  apply = jax.jit(model.apply, static_argnames=('train', 'task'))
  out = apply(variables, image, ids, mask, dn, sizes)  # dn_targets are ignored at inference
  things, stuff = out['things'], out['stuff']
  assert things['dn'] is None and stuff['dn'] is None
  assert things['masks'].shape == (B, Q_THING, SIZE // 4, SIZE // 4)
  assert all('masks' not in aux for aux in things['aux'])
  assert stuff['masks'].shape == (B, Q_STUFF, SIZE // 4, SIZE // 4)
  for path, x in jax.tree_util.tree_leaves_with_path(out):
    if jnp.issubdtype(x.dtype, jnp.floating):
      assert np.isfinite(np.asarray(x)).all(), jax.tree_util.keystr(path)
  grounding = jax.eval_shape(lambda v: model.apply(v, image, ids, mask, task='grounding'),
                             variables)
  assert grounding['things']['logits'].shape == (B, Q_THING, 1)
  assert grounding['stuff']['logits'].shape == (B, Q_STUFF, 1)


def test_chunked_prompt_encoding_matches_direct_encoding(model_and_variables):
  model, variables = model_and_variables
  _, ids, mask, _, _ = _inputs()
  direct, direct_mask = model.apply(variables, ids, mask, method=HIPIEModel.encode_text)
  # One chunk of length 16 per image holding the prompt; prompt positions map to themselves
  # and the two extra (padding) positions of the sequence are marked -1.
  chunk_ids = jnp.pad(ids, ((0, 0), (0, 4)))[:, None]  # [B, 1, 16]
  chunk_mask = jnp.pad(mask, ((0, 0), (0, 4)))[:, None]  # [B, 1, 16]
  index = jnp.concatenate([jnp.broadcast_to(jnp.arange(T), (B, T)),
                           jnp.full((B, 2), -1)], axis=1)  # [B, T + 2]
  chunked, chunked_mask = model.apply(variables, chunk_ids, chunk_mask, index,
                                      method=HIPIEModel.encode_text)
  assert chunked.shape == (B, T + 2, 32)
  np.testing.assert_array_equal(np.asarray(chunked_mask[:, :T]), np.asarray(direct_mask))
  assert not np.asarray(chunked_mask[:, T:]).any()
  valid = np.asarray(direct_mask)
  # BERT masks padded keys, so the extra padding cannot change the real tokens (float32 noise).
  np.testing.assert_allclose(np.asarray(chunked[:, :T])[valid], np.asarray(direct)[valid],
                             atol=1e-5)


def test_config_and_input_errors_are_clear():
  config = _tiny_config()
  config.things.num_querys = 3
  with pytest.raises(ValueError, match=r"config.model.things: unknown keys \['num_querys'\]"):
    build_hipie_model(config)
  config = _tiny_config()
  del config.stuff
  with pytest.raises(ValueError, match=r"missing keys \['stuff'\]"):
    build_hipie_model(config)
  with pytest.raises(ValueError, match='unknown variant'):
    model_config('vit_h')
  model = build_hipie_model(_tiny_config())
  image, ids, mask, _, _ = _inputs()
  with pytest.raises(ValueError, match='divisible by 32'):
    jax.eval_shape(lambda k: model.init(k, image[:, :40], ids, mask), jax.random.key(0))
  with pytest.raises(ValueError, match="task 'segment'"):
    jax.eval_shape(lambda k: model.init(k, image, ids, mask, task='segment'), jax.random.key(0))


def test_r50_config_builds_the_reference_sizes():
  model = build_hipie_model(model_config('r50'))
  assert model.text_encoder.config.hidden_size == 768
  assert model.text_encoder.config.num_hidden_layers == 12
  assert (model.thing_encoder.d_model, model.thing_encoder.num_layers) == (256, 6)
  assert (model.thing_decoder.num_queries, model.thing_decoder.num_decoder_layers) == (900, 6)
  assert (model.stuff_decoder.num_queries, model.stuff_decoder.num_decoder_layers) == (300, 9)
  assert (model.fusion.embed_dim, model.fusion.l_dim, model.fusion.v_dim) == (2048, 768, 256)
  assert model.thing_encoder.fusion_block is model.fusion


def test_per_sample_grounding_equals_the_single_task_modes(model_and_variables):
  model, variables = model_and_variables
  image, ids, mask, _, sizes = _inputs()
  run = jax.jit(lambda grounding, task: model.apply(variables, image, ids, mask,
                                                    image_sizes=sizes, task=task,
                                                    grounding=grounding),
                static_argnames='task')
  # Three programs compiled alike (tests/fast_compile.py).
  with fast_compile():
    single = {task: jax.device_get(run(None, task)) for task in ('detection', 'grounding')}
    mixed_runs = [jax.device_get(run(jnp.asarray(flags), 'detection'))
                  for flags in ([True, False], [False, True])]
  # Same weights and inputs, one batch through different token layouts: float32 noise only.
  tol = dict(rtol=1e-5, atol=1e-5)
  for flags, mixed in zip(([True, False], [False, True]), mixed_runs):
    for i, referring in enumerate(flags):
      want = single['grounding' if referring else 'detection']
      for branch in ('things', 'stuff'):
        got_logits = mixed[branch]['logits'][i]  # [Q, T]
        assert got_logits.shape[-1] == T
        if referring:
          np.testing.assert_allclose(got_logits[:, 0], want[branch]['logits'][i][:, 0], **tol,
                                     err_msg=f'{flags} sample {i} {branch} token 0')
          assert (got_logits[:, 1:] == -5e4).all(), (flags, i, branch)
        else:
          np.testing.assert_allclose(got_logits, want[branch]['logits'][i], **tol,
                                     err_msg=f'{flags} sample {i} {branch} logits')
        for key in ('boxes', 'masks'):
          np.testing.assert_allclose(mixed[branch][key][i], want[branch][key][i], **tol,
                                     err_msg=f'{flags} sample {i} {branch} {key}')
      np.testing.assert_allclose(mixed['things']['ious'][i], want['things']['ious'][i], **tol)
      text_mask = mixed['things']['text_mask'][i]
      if referring:
        np.testing.assert_array_equal(text_mask, np.arange(T) == 0)
      else:
        np.testing.assert_array_equal(text_mask, np.asarray(mask[i]) > 0)


def test_per_sample_grounding_needs_detection_and_one_flag_per_image(model_and_variables):
  model, variables = model_and_variables
  image, ids, mask, _, _ = _inputs()
  with pytest.raises(ValueError, match="per-sample grounding .* needs task='detection'"):
    jax.eval_shape(lambda v: model.apply(v, image, ids, mask, task='grounding',
                                         grounding=jnp.asarray([True, False])), variables)
  with pytest.raises(ValueError, match='one flag per image'):
    jax.eval_shape(lambda v: model.apply(v, image, ids, mask,
                                         grounding=jnp.asarray([True, False, True])), variables)
