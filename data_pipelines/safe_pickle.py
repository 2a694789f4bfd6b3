"""A pickle loader that builds only plain containers and scalars.

RefCOCO ships its referring expressions as a pickle (`refs(unc).p`). Unpickling can call any
importable function, so the file is read with an unpickler that refuses every global except the
plain container types: nothing in the file can run code.
"""

from __future__ import annotations

import os
import pickle
from typing import Any


def _latin1_bytes(text: str, encoding: str) -> bytes:
  """Rebuilds `bytes` the way protocol-2 pickles store them (`_codecs.encode(text, "latin1")`)."""
  if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
    raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
  return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_bytes,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
}


class RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves no global except `set`, `frozenset` and latin-1 `bytes`.

  Args:
    file: binary file object.
    path: file path, named in errors.
  """

  def __init__(self, file, path: str):
    super().__init__(file, encoding="utf-8")
    self._path = path

  def find_class(self, module: str, name: str) -> Any:
    """Returns an allowed container type or refuses.

    Args:
      module: module named by the pickle.
      name: global named by the pickle.

    Returns:
      The container type.

    Raises:
      pickle.UnpicklingError: naming the file and the global for anything else.
    """
    allowed = _ALLOWED_GLOBALS.get((module, name))
    if allowed is None:
      raise pickle.UnpicklingError(
          f"{self._path}: refusing to load global '{module}.{name}': only plain containers and "
          "scalars may be unpickled")
    return allowed

  def persistent_load(self, pid: Any) -> Any:
    """Refuses persistent ids.

    Args:
      pid: the persistent id.

    Raises:
      pickle.UnpicklingError: always.
    """
    raise pickle.UnpicklingError(f"{self._path}: refusing persistent id {pid!r}")


def load_pickle(path: str) -> Any:
  """Loads a pickle of plain containers and scalars.

  Args:
    path: the pickle file.

  Returns:
    The unpickled object (dicts, lists, tuples, sets, strings, bytes, numbers, None).

  Raises:
    FileNotFoundError: naming the path when it does not exist.
    pickle.UnpicklingError: naming the path when the file is not such a pickle.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"pickle file not found: {path}")
  with open(path, "rb") as f:
    try:
      return RestrictedUnpickler(f, path).load()
    except pickle.UnpicklingError as e:
      if str(e).startswith(path):
        raise
      raise pickle.UnpicklingError(f"{path}: not a readable pickle ({e})") from e
    except Exception as e:  # a truncated or corrupt file: every decoding error is reported alike
      raise pickle.UnpicklingError(
          f"{path}: not a readable pickle ({type(e).__name__}: {e})") from e
