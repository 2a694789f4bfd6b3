"""Strict validation of a loss config dict, shared by the AIMS and HIPIE criteria."""

from typing import Any, Dict, Mapping, Tuple

from hiseg_jax.matching import get_matcher


def check_loss_config(name: str, config: Mapping[str, Any],
                      types: Mapping[str, Tuple[type, ...]],
                      dense_keys: Tuple[str, ...] = ()) -> Dict[str, Any]:
  """Validates a loss config against its key -> allowed types table.

  Args:
    name: what the config is, for error messages (e.g. "AIMS loss config").
    config: dict or ConfigDict with exactly the keys of `types`.
    types: key -> allowed Python types (bool is never accepted for numbers).
    dense_keys: point counts that may be 0 (the criterion then uses every prediction cell).

  Returns:
    The settings as a plain dict.

  Raises:
    ValueError: on missing or unknown keys, wrong types, non-positive point counts
      (negative ones for `dense_keys`), bad sampling ratios or an unknown matcher.
  """
  keys = set(config.keys())
  missing = sorted(set(types) - keys)
  unknown = sorted(keys - set(types))
  if missing or unknown:
    raise ValueError(f"{name}: missing keys {missing}, unknown keys {unknown}; expected "
                     f"exactly {sorted(types)}")
  out = {}
  for key, allowed in types.items():
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, allowed):
      raise ValueError(f"{name}: {key} must be {'/'.join(t.__name__ for t in allowed)}, "
                       f"got {value!r}")
    out[key] = value
  for key in ("num_points", "match_num_points", "candidate_k", "block_batch"):
    if key in out and key in dense_keys and out[key] < 0:
      raise ValueError(f"{name}: {key} must be >= 0 (0: every prediction cell), got {out[key]}")
    if key in out and key not in dense_keys and out[key] <= 0:
      raise ValueError(f"{name}: {key} must be > 0, got {out[key]}")
  if out["oversample_ratio"] < 1 or not 0 <= out["importance_sample_ratio"] <= 1:
    raise ValueError(f"{name}: oversample_ratio must be >= 1 and importance_sample_ratio in "
                     f"[0, 1]; got {out['oversample_ratio']} and "
                     f"{out['importance_sample_ratio']}")
  get_matcher(out["matcher"])
  return out
