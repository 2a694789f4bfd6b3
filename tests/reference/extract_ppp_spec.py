"""Writes eval/ppp_partpq_spec.json: the facts of `ppq_ppp_59_57_cvpr21_default`.

Run in the reference environment (tests/reference/README.md):

  /tmp/h3/refenv/bin/python tests/reference/extract_ppp_spec.py eval/ppp_partpq_spec.json

It reads panoptic_parts' own DatasetSpec / PartPQEvalSpec objects and stores only data (class
lists and id mappings), which eval/part_pq.py reads at run time.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from refenv_import import import_panoptic_parts  # pylint: disable=wrong-import-position


def main(out_path):
  """Extracts the eval spec facts.

  Args:
    out_path: where to write the JSON.
  """
  pp = import_panoptic_parts()
  from panoptic_parts.specs.eval_spec import PartPQEvalSpec  # pylint: disable=import-outside-toplevel
  pkg_root = os.path.dirname(os.path.dirname(pp.__file__))
  cwd = os.getcwd()
  os.chdir(pkg_root)
  try:
    spec = PartPQEvalSpec(
        "panoptic_parts/specs/eval_specs/ppq_ppp_59_57_cvpr21_default_evalspec.yaml")
  finally:
    os.chdir(cwd)
  dspec = spec._dspec  # pylint: disable=protected-access
  file2dataset = dspec._sid_pid_file2sid_pid  # pylint: disable=protected-access
  dataset2eval = {}
  for k, v in spec.dataset_sid_pid2eval_sid_pid.items():
    if isinstance(k, int) and v != "IGNORED":
      dataset2eval[int(k)] = int(v)
  file2eval = {}
  for file_sid_pid, dataset_sid_pid in sorted(file2dataset.items()):
    file2eval[str(file_sid_pid)] = dataset2eval.get(dataset_sid_pid, dataset_sid_pid)
  facts = {
      "name": "ppq_ppp_59_57_cvpr21_default",
      "source": "panoptic_parts 2.0rc6 specs/eval_specs/ppq_ppp_59_57_cvpr21_default_evalspec.yaml"
                " with specs/dataset_specs/ppp_datasetspec.yaml",
      "ignore_label": int(spec.ignore_label),
      "eval_sid_things": [int(s) for s in spec.eval_sid_things],
      "eval_sid_stuff": [int(s) for s in spec.eval_sid_stuff],
      "eval_sid_parts": [int(s) for s in spec.eval_sid_parts],
      "eval_sid2parts": {
          str(c["sem_cls"][0]): [int(p) for p in c["parts_cls"]]
          for c in spec.cat_definition["cat_def"] if len(c["parts_cls"]) > 1},
      "eval_sid2scene_label": {str(k): str(v) for k, v in spec.eval_sid2scene_label.items()},
      "eval_sid_pid2eval_pid_flat": {
          str(k): int(v) for k, v in spec.eval_sid_pid2eval_pid_flat.items()},
      "eval_pid_flat2scene_part_label": {
          str(k): str(v) for k, v in spec.eval_pid_flat2scene_part_label.items()},
      "file_sid_pid2eval_sid_pid": file2eval,
  }
  with open(out_path, "w") as f:
    json.dump(facts, f, indent=1, sort_keys=True)
  print(f"wrote {out_path}: {len(facts['eval_sid_things']) + len(facts['eval_sid_stuff'])} scene "
        f"classes, {len(facts['eval_sid_pid2eval_pid_flat'])} part classes")


if __name__ == "__main__":
  main(sys.argv[1])
