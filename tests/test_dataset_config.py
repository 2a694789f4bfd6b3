"""`config.datasets` entries -> readers: path resolution, root overrides and errors."""

import ml_collections
import pytest

from data_pipelines import dataset_config
from data_pipelines import synthetic


def test_synthetic_entries_resolve_to_the_generated_layout(tmp_path):
  root = str(tmp_path / 'syn')
  summary = synthetic.generate(root, num_train=2, num_val=1, image_size=64, seed=0)
  for split in ('train', 'val'):
    for fmt, expected in summary['readers'][split].items():
      entry = dataset_config.synthetic_entry(fmt, split)
      assert entry.root == ''
      got = dataset_config.reader_arguments('d', entry, root)
      assert got == dict(expected, name='d'), (fmt, split)
  datasets = ml_collections.ConfigDict({
      'coco': dataset_config.synthetic_entry('coco_panoptic', 'train'),
      'psg_val': dataset_config.synthetic_entry('psg', 'val')})
  sources = dataset_config.build_sources(datasets, ['coco', 'psg_val'], root)
  assert len(sources['coco']) == 2 and len(sources['psg_val']) == 1
  assert sources['coco'][0].dataset == 'coco'


def test_explicit_root_overrides_the_default(tmp_path):
  entry = dataset_config.synthetic_entry('paco', 'train')
  entry.root = '/data/paco'
  got = dataset_config.reader_arguments('paco', entry, str(tmp_path))
  assert got['annotation_file'] == '/data/paco/paco/paco_train.json'
  assert got['image_root'] == '/data/paco/images/train'


def test_bad_entries_name_the_entry(tmp_path):
  datasets = ml_collections.ConfigDict({
      'x': {'format': 'kitti', 'root': ''},
      'y': {'root': ''},
      'z': {'format': 'paco', 'root': '', 'annotation_file': 'a.json', 'image_root': 'i',
            'colour': 'red'}})
  with pytest.raises(ValueError, match="config.datasets.x: unknown format 'kitti'"):
    dataset_config.build_sources(datasets, ['x'], str(tmp_path))
  with pytest.raises(ValueError, match="config.datasets.y: needs 'format'"):
    dataset_config.build_sources(datasets, ['y'], str(tmp_path))
  with pytest.raises(ValueError, match='config.datasets.z: arguments'):
    dataset_config.build_sources(datasets, ['z'], str(tmp_path))
  with pytest.raises(KeyError, match="no entry 'w'"):
    dataset_config.build_sources(datasets, ['w'], str(tmp_path))
