"""The Fashion-MNIST loader: real IDX files, checksums, cache and the error listing every source."""

import gzip
import importlib
import importlib.abc
import shutil
import sys

import numpy as np
import pytest

from d2l_lenet import data

IDX_DIR = data.DEBIAN_IDX_DIR
NAMES = list(data.IDX_SHA256)


@pytest.fixture(scope='module')
def real_idx_dir(tmp_path_factory):
  """A private copy of the real IDX files (CI installs Debian's dataset-fashion-mnist)."""
  copy = tmp_path_factory.mktemp('idx')
  for name in NAMES:
    source = f'{IDX_DIR}/{name}.gz'
    try:
      shutil.copy(source, copy)
    except FileNotFoundError:
      pytest.fail(f'{source} is missing: apt-get install dataset-fashion-mnist')
  return copy


def test_loads_real_data_from_idx_and_then_from_cache(real_idx_dir, tmp_path):
  ds = data.load_fashion_mnist(tmp_path, real_idx_dir, download=False)
  assert ds.source.startswith('IDX files')
  assert ds.train_images.shape == (60000, 28, 28, 1) and ds.train_images.dtype == np.float32
  assert ds.test_images.shape == (10000, 28, 28, 1)
  assert ds.train_labels.dtype == np.int32 and set(np.unique(ds.train_labels)) == set(range(10))
  assert 0.0 == ds.train_images.min() and ds.train_images.max() == 1.0
  # Fashion-MNIST is balanced: 6,000 / 1,000 examples per class.
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [1000] * 10)

  cached = data.load_fashion_mnist(tmp_path, idx_dir=None, download=False)
  assert cached.source.startswith('jaxbn cache')
  np.testing.assert_array_equal(cached.train_images, ds.train_images)
  np.testing.assert_array_equal(cached.test_labels, ds.test_labels)


def test_subset_takes_the_first_examples(real_idx_dir, tmp_path):
  ds = data.load_fashion_mnist(tmp_path, real_idx_dir, download=False)
  sub = ds.subset(100, 10)
  assert len(sub.train_labels) == 100 and len(sub.test_images) == 10
  np.testing.assert_array_equal(sub.train_images, ds.train_images[:100])


def _corrupt_copy(real_idx_dir, tmp_path, name, payload: bytes | None, truncate=False):
  folder = tmp_path / 'idx'
  shutil.copytree(real_idx_dir, folder)
  path = folder / f'{name}.gz'
  if truncate:
    path.write_bytes(path.read_bytes()[:1000])
  elif payload is not None:
    with gzip.open(path, 'wb') as f:
      f.write(payload)
  else:
    path.unlink()
  return folder


@pytest.mark.parametrize(
  'kind, pattern',
  [
    ('missing', r'No such file.*t10k-labels-idx1-ubyte\.gz'),
    ('truncated', r't10k-labels-idx1-ubyte\.gz is not a complete gzip file'),
    ('changed', r't10k-labels-idx1-ubyte\.gz decompresses to data with SHA-256'),
  ],
)
def test_bad_idx_files_are_named_in_the_error(real_idx_dir, tmp_path, kind, pattern):
  name = 't10k-labels-idx1-ubyte'
  payload = b'\x00\x00\x08\x01\x00\x00\x00\x02\x01\x02' if kind == 'changed' else None
  folder = _corrupt_copy(real_idx_dir, tmp_path, name, payload, truncate=kind == 'truncated')
  with pytest.raises(data.DataNotFoundError, match=pattern) as info:
    data.load_fashion_mnist(tmp_path / 'data', folder, download=False)
  message = str(info.value)
  # Every place looked at is listed, with how to provide the data.
  assert 'jaxbn cache' in message and 'prepared tfds data' in message
  assert 'apt-get install dataset-fashion-mnist' in message
  assert '--config.data.idx_dir' in message
  assert not (tmp_path / 'data' / data.CACHE_NAME).exists()


def test_read_idx_checks_the_decompressed_bytes(real_idx_dir):
  labels = data.read_idx(real_idx_dir / 'train-labels-idx1-ubyte.gz', 'train-labels-idx1-ubyte')
  assert labels.shape == (60000,) and labels.dtype == np.uint8
  with pytest.raises(data.CorruptDataError, match='train-images-idx3-ubyte of Fashion-MNIST'):
    data.read_idx(real_idx_dir / 'train-labels-idx1-ubyte.gz', 'train-images-idx3-ubyte')


def test_a_damaged_cache_is_reported_and_rebuilt(real_idx_dir, tmp_path):
  cache = tmp_path / data.CACHE_NAME
  cache.parent.mkdir(parents=True)
  np.savez(cache, train_images=np.zeros((3, 28, 28), np.uint8))
  with pytest.raises(data.DataNotFoundError, match=r'holds arrays .* expected'):
    data.load_fashion_mnist(tmp_path, idx_dir=None, download=False)
  ds = data.load_fashion_mnist(tmp_path, real_idx_dir, download=False)
  assert ds.source.startswith('IDX files')
  assert data.load_fashion_mnist(tmp_path, None, download=False).source.startswith('jaxbn cache')


def test_a_cache_with_other_contents_is_refused(real_idx_dir, tmp_path):
  """Right shapes, wrong values (one pixel changed): the cache's digest check finds it."""
  data.load_fashion_mnist(tmp_path, real_idx_dir, download=False)
  cache = tmp_path / data.CACHE_NAME
  with np.load(cache) as npz:
    arrays = dict(npz)
  arrays['test_images'][123, 14, 14] ^= 1
  np.savez(cache, **arrays)
  with pytest.raises(data.DataNotFoundError, match=r'holds test_images that differ'):
    data.load_fashion_mnist(tmp_path, idx_dir=None, download=False)


def test_sources_are_tried_in_order(real_idx_dir, tmp_path, monkeypatch):
  """jaxbn's cache, then tfds's prepared copy, then the IDX files, then a tfds download."""
  calls = []

  def fake_tfds(data_dir, download):
    calls.append(download)
    if download or fail_prepared:
      raise RuntimeError('no tfds here')
    return data.Dataset(*[np.zeros(1)] * 4, source='tfds')

  monkeypatch.setattr(data, '_load_tfds', fake_tfds)
  (tmp_path / 'fashion_mnist').mkdir()  # as if tfds had prepared it
  fail_prepared = False
  assert data.load_fashion_mnist(tmp_path, real_idx_dir).source == 'tfds'
  assert calls == [False]  # a prepared copy is read, never downloaded again
  fail_prepared = True
  assert data.load_fashion_mnist(tmp_path, real_idx_dir).source.startswith('IDX files')
  assert data.load_fashion_mnist(tmp_path, real_idx_dir).source.startswith('jaxbn cache')
  assert calls == [False, False]  # the cache comes first
  (tmp_path / data.CACHE_NAME).unlink()
  with pytest.raises(data.DataNotFoundError) as info:
    data.load_fashion_mnist(tmp_path, tmp_path / 'no-idx', download=True)
  assert calls == [False, False, False, True]
  assert 'tfds download into' in str(info.value) and 'no tfds here' in str(info.value)
  calls.clear()
  with pytest.raises(data.DataNotFoundError):
    data.load_fashion_mnist(tmp_path, tmp_path / 'no-idx', download=False)
  assert calls == [False]


class WithoutTensorFlow(importlib.abc.MetaPathFinder):
  """An import finder that finds what ``finder`` does, but never TensorFlow."""

  def __init__(self, finder):
    self.finder = finder

  def find_spec(self, name, path, target=None):
    if name == 'tensorflow' or name.startswith('tensorflow.'):
      return None
    return self.finder.find_spec(name, path, target)


def test_a_download_without_tensorflow_says_how_to_install_it(tmp_path, monkeypatch):
  """The real tfds branch: preparing the data set needs TensorFlow, and the error says so."""
  importlib.import_module('tensorflow_datasets')  # imported as usual, TensorFlow or not
  # As where TensorFlow is not installed (pip install jaxbn without the tf extra).
  for name in [m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setattr(sys, 'meta_path', [WithoutTensorFlow(f) for f in sys.meta_path])
  pattern = r'tfds download into .*tfds needs TensorFlow.*pip install "jaxbn\[tf\]"'
  with pytest.raises(data.DataNotFoundError, match=pattern):
    data.load_fashion_mnist(tmp_path, idx_dir=None, download=True)
