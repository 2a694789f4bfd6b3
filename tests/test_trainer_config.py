"""Config validation, the registry contract and the main command's flags."""

import dataclasses
import os
import subprocess
import sys

import ml_collections
import pytest

import aims_micro
import hipie_micro
import trainer_toy
from eval import aims_eval
from hiseg_jax import config_validation
from hiseg_jax import registry
from hiseg_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY_CONFIG = os.path.join(REPO, 'tests', 'trainer_toy.py')


def _main(workdir, *flags, **env):
  return subprocess.run(
      [sys.executable, '-m', 'hiseg_jax.main', '--config', TOY_CONFIG,
       '--workdir', str(workdir), *flags],
      env=dict(os.environ, PYTHONPATH=REPO, **env), capture_output=True,
      text=True, timeout=300)


def test_toy_config_is_valid():
  config_validation.validate(trainer_toy.get_config(), ('model', 'data'))


def test_unknown_top_level_key_fails_in_train_and_evaluate(tmp_path):
  config = trainer_toy.get_config()
  config.totl_steps = 5
  with pytest.raises(ValueError, match=r'config\.totl_steps: unknown key'):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'checkpoints')


def test_every_problem_is_listed():
  # Built from a dict, as a config file could write it (ConfigDict's own type
  # safety only guards later assignments).
  raw = trainer_toy.get_config().to_dict()
  raw['optim']['lr_muliplier'] = 0.1
  raw['mesh']['model'] = 2
  raw['total_steps'] = '10'
  raw['async_checkpoints'] = 1
  raw['eval_every'] = -1
  raw['optim']['decay_steps'] = (1.5,)
  del raw['log_every']
  config = ml_collections.ConfigDict(raw)
  with pytest.raises(ValueError) as error:
    config_validation.validate(config, ('model', 'data'))
  message = str(error.value)
  for expected in ['config.optim.lr_muliplier: unknown key',
                   'config.mesh.model: unknown key',
                   "config.total_steps must be an int, got '10'",
                   'config.async_checkpoints must be a bool, got 1',
                   'config.eval_every must be >= 0, got -1',
                   'config.optim.decay_steps must be a tuple of ints',
                   'config.log_every: missing']:
    assert expected in message


def test_model_sections_come_from_the_spec():
  config = trainer_toy.get_config()
  with pytest.raises(ValueError, match=r'config\.data: unknown key'):
    config_validation.validate(config, ('model',))
  del config['model']
  with pytest.raises(ValueError, match='config.model.name is missing'):
    config_validation.model_name(config)


def test_registry_errors():
  with pytest.raises(KeyError, match="unknown model 'nope'.*trainer_toy"):
    registry.get('nope')
  with pytest.raises(ValueError, match='already registered'):
    registry.register(trainer_toy.NAME, trainer_toy.SPEC)
  with pytest.raises(TypeError, match='expected a ModelSpec'):
    registry.register('other', {'build': None})
  assert registry.get(trainer_toy.NAME) is trainer_toy.SPEC


def test_main_rejects_unknown_override_and_wrong_type(tmp_path):
  result = _main(tmp_path / 'a', '--config.totl_steps=5')
  assert result.returncode != 0
  assert 'totl_steps' in result.stderr and 'total_steps' in result.stderr
  result = _main(tmp_path / 'b', '--config.total_steps=abc')
  assert result.returncode != 0
  assert '--config.total_steps=abc' in result.stderr
  result = _main(tmp_path / 'c', '--config.optim.decay_steps=(1.5,)')
  assert result.returncode != 0
  assert 'config.optim.decay_steps must be a tuple of ints' in result.stderr
  assert not os.path.exists(tmp_path / 'c')


def test_main_runs_with_overrides(tmp_path):
  result = _main(tmp_path, '--config.total_steps=3', '--config.eval_every=0',
                 '--config.seed=5')
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']
  assert sorted(os.listdir(tmp_path / 'eval')) == ['3']


def test_batch_the_mesh_does_not_divide_fails_before_writing(tmp_path):
  workdir = tmp_path / 'run'
  result = _main(workdir, '--config.batch_size=6',
                 XLA_FLAGS='--xla_force_host_platform_device_count=4')
  assert result.returncode != 0
  assert ('config.batch_size=6 is not divisible by the 4 devices of the mesh'
          in result.stderr)
  assert not workdir.exists()


def _missing_data(config, workdir):
  """A `make_train_iterator` that fails as a missing dataset would."""
  del config
  raise FileNotFoundError(f'no training data under {workdir}')


def test_data_pipeline_error_stops_the_run(tmp_path):
  # The iterator is built in a thread while the state compiles; its error must
  # still end the run, before any step or checkpoint.
  name = 'trainer_toy_missing_data'
  if name not in registry.names():
    registry.register(name, dataclasses.replace(
        trainer_toy.SPEC, make_train_iterator=_missing_data))
  config = trainer_toy.get_config()
  config.model.name = name
  with pytest.raises(FileNotFoundError, match='no training data under'):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path / 'checkpoints')
  assert not os.path.exists(tmp_path / 'metrics.jsonl')


def test_bad_aims_eval_config_fails_before_training(tmp_path):
  # config.eval is first read at the final evaluation; the spec's check_config stops the run
  # at start instead, before any data, compilation or checkpoint.
  config = aims_micro.get_config()
  config.eval.mask_nms = 'soft'
  config.eval.top_k = 0
  config.eval.image_size = 100
  config.eval.entity_part = 'ppp_vall'
  config.eval.split_components = ('part', 'relation')
  with pytest.raises(ValueError) as error:
    trainer.train_and_evaluate(config, str(tmp_path))
  message = str(error.value)
  for expected in ["config.eval.mask_nms must be one of ('none', 'matrix'), got 'soft'",
                   'config.eval.top_k must be an int >= 1, got 0',
                   'config.eval.image_size must be a positive multiple of 32, got 100',
                   "config.eval.entity_part must be '' or one of config.datasets",
                   "got 'ppp_vall'",
                   'config.eval.split_components must be a tuple of distinct levels from '
                   "('part', 'entity'), got ('part', 'relation')"]:
    assert expected in message, (expected, message)
  assert os.listdir(tmp_path) == []


def test_aims_eval_config_keys_are_checked():
  raw = aims_micro.get_config().to_dict()
  raw['eval']['topk'] = 5
  del raw['eval']['relation_entity']
  with pytest.raises(ValueError) as error:
    aims_eval.check_eval_config(ml_collections.ConfigDict(raw))
  assert 'config.eval.topk: unknown key' in str(error.value)
  assert 'config.eval.relation_entity: missing' in str(error.value)
  aims_eval.check_eval_config(aims_micro.get_config())


def test_bad_hipie_eval_config_fails_before_training(tmp_path):
  config = hipie_micro.get_config()
  config.eval.top_k = 0
  with pytest.raises(ValueError, match="HIPIE eval config 'top_k' must be an int >= 1, got 0"):
    trainer.train_and_evaluate(config, str(tmp_path))
  assert os.listdir(tmp_path) == []
