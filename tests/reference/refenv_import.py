"""Imports `panoptic_parts` 2.0rc6 inside the reference environment.

The package's `specs/dataset_spec.py` compares `float(platform.python_version()[:3])` with 3.6,
which reads "3.11" as 3.1 and refuses to import. The version string is patched only for the
import. Used by the reference scripts in this folder, which run in a separate virtual environment
(see README.md here), never by the library or the tests.
"""

import platform


def import_panoptic_parts():
  """Imports panoptic_parts with the Python version check sidestepped.

  Returns:
    The imported `panoptic_parts` module.
  """
  original = platform.python_version
  platform.python_version = lambda: "3.9.0"
  try:
    import panoptic_parts  # pylint: disable=import-outside-toplevel
    import panoptic_parts.specs.dataset_spec  # pylint: disable=import-outside-toplevel,unused-import
  finally:
    platform.python_version = original
  return panoptic_parts
