"""Matchers between predictions and padded ground truth, and their costs.

`get_matcher(name)` returns a one-to-one matcher with the contract documented in
`hiseg_jax.matching.hungarian`: `(cost [..., N, M], gt_valid [..., M]) ->
(pred_idx int32 [..., M], matched bool [..., M])`.
"""

from typing import Callable, Tuple

import jax

from hiseg_jax.matching.costs import batch_dice_cost
from hiseg_jax.matching.costs import batch_sigmoid_ce_cost
from hiseg_jax.matching.costs import mask_matching_cost
from hiseg_jax.matching.costs import objectness_cost
from hiseg_jax.matching.hungarian import hungarian_device
from hiseg_jax.matching.hungarian import hungarian_host
from hiseg_jax.matching.hungarian import matched_queries

Matcher = Callable[[jax.Array, jax.Array], Tuple[jax.Array, jax.Array]]

MATCHERS = {
    "hungarian_host": hungarian_host,
    "hungarian_device": hungarian_device,
}


def get_matcher(name: str) -> Matcher:
  """Returns the one-to-one matcher registered under `name`.

  Args:
    name: "hungarian_host" (scipy on the host, the default) or
      "hungarian_device" (optax on device).

  Returns:
    The matcher function.

  Raises:
    ValueError: for an unknown name, listing the known ones.
  """
  if name not in MATCHERS:
    raise ValueError(f"hiseg_jax.matching.get_matcher: unknown matcher {name!r}; "
                     f"known matchers: {sorted(MATCHERS)}")
  return MATCHERS[name]


__all__ = [
    "MATCHERS",
    "Matcher",
    "batch_dice_cost",
    "batch_sigmoid_ce_cost",
    "get_matcher",
    "hungarian_device",
    "hungarian_host",
    "mask_matching_cost",
    "matched_queries",
    "objectness_cost",
]
