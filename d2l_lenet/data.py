"""Fashion-MNIST in memory: NHWC float32 images in [0, 1] and int32 labels.

`load_fashion_mnist` looks in four places, in this order, and uses the first
that works:

1. jaxbn's own cache of the IDX files (``data_dir/jaxbn/fashion_mnist.npz``);
2. a copy that tensorflow-datasets (tfds) has already prepared in ``data_dir``;
3. the four raw IDX files in ``idx_dir`` (by default where Debian's
   ``dataset-fashion-mnist`` puts them), checked against the SHA-256 of the
   decompressed data set and then cached as in 1;
4. a tfds download (needs internet and TensorFlow), prepared in ``data_dir``.

If all fail, one `DataNotFoundError` says what each place held and how to
provide the data. Debian's ``.gz`` files are recompressed, so tfds rejects them
by their checksums; step 3 reads them without tfds. Sources 1 and 3 keep the
IDX order of examples; tfds stores them in another order, so the same seed
gives the same run only with the same source.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import os
import pathlib

import numpy as np

from d2l_lenet import files

DEBIAN_IDX_DIR = '/usr/share/datasets/fashion-mnist'
NUM_CLASSES = 10
NUM_TRAIN, NUM_TEST = 60000, 10000
CACHE_NAME = 'jaxbn/fashion_mnist.npz'

# SHA-256 of the decompressed IDX files: the bytes of the data set itself,
# whatever compressed them.
IDX_SHA256 = {
  'train-images-idx3-ubyte': 'c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888',
  'train-labels-idx1-ubyte': 'bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9',
  't10k-images-idx3-ubyte': '5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b',
  't10k-labels-idx1-ubyte': '0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34',
}


# The arrays of a `Dataset` (as uint8, before scaling) and the IDX files they come from.
IDX_FILES = {
  'train_images': 'train-images-idx3-ubyte',
  'train_labels': 'train-labels-idx1-ubyte',
  'test_images': 't10k-images-idx3-ubyte',
  'test_labels': 't10k-labels-idx1-ubyte',
}


class DataNotFoundError(FileNotFoundError):
  """Raised when no source of Fashion-MNIST worked; lists each one tried."""


class CorruptDataError(ValueError):
  """Raised when an IDX file exists but is truncated or not the data set."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Fashion-MNIST in memory.

  Images are (N, 28, 28, 1) float32 in [0, 1]; labels are (N,) int32 in 0..9.
  ``source`` says where the data came from.
  """

  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  source: str

  def subset(self, num_train: int = 0, num_test: int = 0) -> Dataset:
    """The first ``num_train`` / ``num_test`` examples (0 keeps all)."""
    tr = slice(None) if num_train <= 0 else slice(num_train)
    te = slice(None) if num_test <= 0 else slice(num_test)
    return Dataset(
      self.train_images[tr],
      self.train_labels[tr],
      self.test_images[te],
      self.test_labels[te],
      self.source,
    )


def default_data_dir() -> pathlib.Path:
  """Where tfds keeps prepared data sets (``$TFDS_DATA_DIR`` or ~/tensorflow_datasets)."""
  return pathlib.Path(
    os.environ.get('TFDS_DATA_DIR', pathlib.Path.home() / 'tensorflow_datasets')
  ).expanduser()


def _to_dataset(arrays: dict[str, np.ndarray], source: str) -> Dataset:
  def images(u8):
    return (u8.astype(np.float32) / 255.0).reshape(-1, 28, 28, 1)

  return Dataset(
    images(arrays['train_images']),
    arrays['train_labels'].astype(np.int32),
    images(arrays['test_images']),
    arrays['test_labels'].astype(np.int32),
    source,
  )


def read_idx(path: str | os.PathLike, name: str) -> np.ndarray:
  """Reads one gzipped IDX file, verifying the SHA-256 of its decompressed bytes.

  Args:
    path: the ``.gz`` file.
    name: its name in `IDX_SHA256`, e.g. ``'train-images-idx3-ubyte'``.

  Returns:
    uint8 array, (N, 28, 28) for images or (N,) for labels.

  Raises:
    FileNotFoundError: if the file is missing.
    CorruptDataError: if it is truncated, not gzip, or not Fashion-MNIST.
  """
  path = pathlib.Path(path)
  try:
    with gzip.open(path, 'rb') as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    if isinstance(e, FileNotFoundError):
      raise
    raise CorruptDataError(
      f'{path} is not a complete gzip file ({e}): reinstall it, e.g. '
      '`apt-get install --reinstall dataset-fashion-mnist`.'
    ) from e
  digest = hashlib.sha256(raw).hexdigest()
  if digest != IDX_SHA256[name]:
    raise CorruptDataError(
      f'{path} decompresses to data with SHA-256 {digest}, but {name} of '
      f'Fashion-MNIST has {IDX_SHA256[name]}: the file is corrupt or another '
      'data set. Replace it with the original file.'
    )
  ndim = raw[3]
  dims = np.frombuffer(raw, '>u4', count=ndim, offset=4)
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _load_idx_dir(idx_dir: pathlib.Path) -> dict[str, np.ndarray]:
  return {key: read_idx(idx_dir / f'{name}.gz', name) for key, name in IDX_FILES.items()}


def _idx_bytes(array: np.ndarray) -> bytes:
  """The decompressed IDX file of a uint8 ``array``: magic, big-endian sizes, values."""
  return bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, '>u4').tobytes() + array.tobytes()


def _write_cache(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  """Writes the uint8 arrays atomically, so a killed run leaves no half file."""
  with files.atomic_file(path) as f:
    np.savez(f, **arrays)


def _read_cache(path: pathlib.Path) -> dict[str, np.ndarray]:
  """The cached arrays, checked against the SHA-256 of the IDX files they were read from."""
  with np.load(path) as npz:
    arrays = {k: npz[k] for k in npz.files}
  expected = {
    'train_images': (NUM_TRAIN, 28, 28),
    'train_labels': (NUM_TRAIN,),
    'test_images': (NUM_TEST, 28, 28),
    'test_labels': (NUM_TEST,),
  }
  got = {k: v.shape for k, v in arrays.items()}
  if got != expected:
    raise CorruptDataError(f'{path} holds arrays {got}, expected {expected}: delete it.')
  for key, name in IDX_FILES.items():
    if arrays[key].dtype != np.uint8 or (
      hashlib.sha256(_idx_bytes(arrays[key])).hexdigest() != IDX_SHA256[name]
    ):
      raise CorruptDataError(
        f'{path} holds {key} that differ from Fashion-MNIST ({name}): delete it, '
        'and it is rebuilt from the IDX files.'
      )
  return arrays


def _hide_gpus_from_tensorflow() -> None:
  """TensorFlow only feeds data here; it must not take the GPU memory JAX needs."""
  import tensorflow as tf

  tf.config.set_visible_devices([], 'GPU')


def _load_tfds(data_dir: pathlib.Path, download: bool) -> Dataset:
  import tensorflow_datasets as tfds

  builder = tfds.builder('fashion_mnist', data_dir=data_dir)
  if not builder.is_prepared():
    if not download:
      raise FileNotFoundError(f'tfds has not prepared fashion_mnist in {data_dir}.')
    try:
      _hide_gpus_from_tensorflow()
    except ImportError as e:
      raise ImportError(
        'tfds needs TensorFlow to prepare data sets: pip install "jaxbn[tf]".'
      ) from e
    builder.download_and_prepare()
  _hide_gpus_from_tensorflow()
  splits = tfds.as_numpy(builder.as_dataset(batch_size=-1))
  arrays = {}
  for split, prefix in (('train', 'train'), ('test', 'test')):
    arrays[f'{prefix}_images'] = splits[split]['image'][..., 0]
    arrays[f'{prefix}_labels'] = splits[split]['label']
  return _to_dataset(arrays, f'tfds ({data_dir})')


def load_fashion_mnist(
  data_dir: str | os.PathLike | None = None,
  idx_dir: str | os.PathLike | None = DEBIAN_IDX_DIR,
  download: bool = True,
) -> Dataset:
  """Loads all of Fashion-MNIST into memory (see the module docstring for the order).

  Args:
    data_dir: tfds data directory, also holding jaxbn's cache; default
      `default_data_dir()`.
    idx_dir: folder with the four ``*-ubyte.gz`` IDX files, or None to skip.
    download: whether tfds may download and prepare the data set.

  Returns:
    A `Dataset` of 60,000 training and 10,000 test examples.

  Raises:
    DataNotFoundError: if no source worked; the message lists each.
  """
  data_dir = pathlib.Path(data_dir).expanduser() if data_dir else default_data_dir()
  cache = data_dir / CACHE_NAME
  failures = []

  if cache.exists():
    try:
      return _to_dataset(_read_cache(cache), f'jaxbn cache ({cache})')
    except Exception as e:
      failures.append(f'jaxbn cache {cache}: {e}')
  else:
    failures.append(f'jaxbn cache {cache}: not there yet')
  if (data_dir / 'fashion_mnist').is_dir():
    try:
      return _load_tfds(data_dir, download=False)
    except Exception as e:  # each failure is reported below
      failures.append(f'prepared tfds data in {data_dir}: {e}')
  else:
    failures.append(f'prepared tfds data in {data_dir}: none')
  if idx_dir is not None:
    try:
      arrays = _load_idx_dir(pathlib.Path(idx_dir))
    except (OSError, CorruptDataError) as e:
      failures.append(f'IDX files in {idx_dir}: {e}')
    else:
      try:
        _write_cache(cache, arrays)
      except OSError as e:
        print(f'jaxbn: could not cache the data set at {cache} ({e}); continuing.')
      return _to_dataset(arrays, f'IDX files ({idx_dir})')
  if download:
    try:
      return _load_tfds(data_dir, download=True)
    except Exception as e:
      failures.append(f'tfds download into {data_dir}: {type(e).__name__}: {e}')
  raise DataNotFoundError(
    'Fashion-MNIST was not found. Tried:\n'
    + '\n'.join(f'  - {f}' for f in failures)
    + '\nProvide it in one of these ways:\n'
    f'  - Debian/Ubuntu: apt-get install dataset-fashion-mnist (files in {DEBIAN_IDX_DIR})\n'
    '  - put the four *-ubyte.gz files in a folder and pass --config.data.idx_dir=FOLDER\n'
    '  - with internet and `pip install "jaxbn[tf]"`, let tfds download it '
    '(--config.data.download=True)'
  )
