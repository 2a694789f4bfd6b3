"""What every command line does first: quiet orbax's logs, keep freed host memory, validate the
config, start jax.distributed.

Shared by `python -m hiseg_jax.main` and `python -m eval.evaluate`.
"""

import logging as std_logging

import jax
import ml_collections
from absl import logging

from hiseg_jax import config_validation
from hiseg_jax import host_memory
from hiseg_jax import registry


def _quiet_orbax(record: std_logging.LogRecord) -> bool:
  """Drops orbax's per-save INFO records so progress bars stay readable."""
  return record.levelno > std_logging.INFO or '/orbax/' not in record.pathname


def start(config: ml_collections.ConfigDict) -> registry.ModelSpec:
  """Prepares a process to run a config.

  Args:
    config: the parsed run config.

  Returns:
    The registered spec of `config.model.name`.

  Raises:
    ValueError: listing every problem of the config (see `config_validation.validate`).
    KeyError: for an unknown model name.
  """
  logging.get_absl_handler().addFilter(_quiet_orbax)
  host_memory.keep_freed_memory()
  spec = registry.get(config_validation.model_name(config))
  config_validation.validate(config, spec.config_sections)
  if config.multihost:
    jax.distributed.initialize()
  return spec
