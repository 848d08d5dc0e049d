r"""The GPU check (`make gpu-check`): accelerator tests, the chapter's training, throughput.

  python benchmarks/gpu_check.py --json results/gpu/results.json [--data-dir DIR]
  python benchmarks/gpu_check.py --dry-run --json /tmp/gpu.json   # any machine, tiny sizes

On a machine where JAX sees a GPU, in a few minutes:

1. environment: JAX, its devices (the GPU's name), the commit, CPU and packages;
2. ``pytest -m accelerator`` (tests/test_accelerator.py): pass, fail and skip counts;
3. ``train.py --config configs/lenet_bn.py``, the chapter's 10 epochs: test
   accuracy and examples/s of each epoch;
4. steady-state training throughput of the jaxbn, Flax and no-BN LeNets and of
   jaxbn's in bfloat16, as benchmarks/throughput.py measures it: batch 256, the
   training set on the device, ``conv_impl='auto'`` (the backend's own
   convolutions), epoch-long rounds taken in turn, the median kept.

It writes one JSON and exits non-zero if a test failed or training did not
finish with at least `ACCURACY_FLOOR` test accuracy; throughput below
`TARGET` is reported, not an error. It installs nothing and never downloads:
Fashion-MNIST comes from ``--data-dir`` (the four IDX ``.gz`` files, or jaxbn's
cache ``jaxbn/fashion_mnist.npz`` under it) or from jaxbn's usual places, read
without TensorFlow (the JSON's ``data.tensorflow_loaded`` says so). ``--dry-run``
runs every stage at tiny sizes on whatever JAX finds (the CPU in CI) and writes
the same fields.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

# The test and training processes share the GPU with this one: none may take
# most of its memory up front. Set before JAX starts.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')

import jax
import throughput as throughput_lib  # benchmarks/throughput.py

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # d2l_lenet runs from the checkout

from d2l_lenet import data as data_lib  # noqa: E402
from d2l_lenet import models, provenance  # noqa: E402
from d2l_lenet import workdir as workdir_lib  # noqa: E402

BATCH_SIZE = 256
VARIANTS = (('jaxbn', None), ('flax', None), ('none', None), ('jaxbn', 'bfloat16'))
ACCURACY_FLOOR = 0.8  # the chapter's 10 epochs give 0.83-0.89 over seeds (README, Results)
TARGET = 1_000_000  # examples/s of the jaxbn LeNet on a modern GPU
REFERENCE = 60_220  # examples/s of the seed's PyTorch nn.BatchNorm LeNet on a GPU
INSTALL = 'pip install -e ".[train,test]" "jax[cuda12]"'


@dataclasses.dataclass(frozen=True)
class Sizes:
  """How much each stage does; 0 examples means all of them."""

  epochs: int
  num_train: int
  num_test: int
  accuracy_floor: float
  warmup_steps: int
  steps_per_round: int
  rounds: int


FULL = Sizes(10, 0, 0, ACCURACY_FLOOR, warmup_steps=234, steps_per_round=234, rounds=10)
DRY = Sizes(1, 512, 500, 0.0, warmup_steps=1, steps_per_round=2, rounds=2)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--json', type=pathlib.Path, required=True, help='the results file')
  parser.add_argument(
    '--data-dir', type=pathlib.Path, help='folder with the IDX .gz files or jaxbn/fashion_mnist.npz'
  )
  parser.add_argument('--dry-run', action='store_true', help='tiny sizes, on any device')
  parser.add_argument('--epochs', type=int, help='training epochs (default 10; dry run 1)')
  return parser.parse_args(argv)


def child_env() -> dict[str, str]:
  """This environment, with the CPU platform kept for the tests' comparisons with the CPU.

  (tests/conftest.py chooses the CPU when JAX_PLATFORMS is unset; '' lets JAX choose.)
  """
  platforms = os.environ.get('JAX_PLATFORMS', '')
  if platforms and 'cpu' not in platforms.split(','):
    platforms += ',cpu'
  return {**os.environ, 'JAX_PLATFORMS': platforms}


def nvidia_smi() -> str | None:
  """The GPUs' name, driver and memory as nvidia-smi gives them, or None without it."""
  query = ['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader']
  try:
    return subprocess.run(query, capture_output=True, text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def environment() -> dict:
  devices = jax.devices()
  return {
    'jax_version': jax.__version__,
    'backend': jax.default_backend(),
    'devices': [f'{d.platform}:{d.id} {d.device_kind}' for d in devices],
    'gpu': devices[0].device_kind if devices[0].platform == 'gpu' else None,
    'nvidia_smi': nvidia_smi(),
  }


def junit_counts(path: pathlib.Path) -> dict[str, int | None]:
  """Passed, failed, errors and skipped of a pytest --junitxml file (None if it is missing)."""
  keys = ('passed', 'failed', 'errors', 'skipped')
  if not path.exists():
    return dict.fromkeys(keys)
  suite = ET.parse(path).getroot().find('testsuite')
  failed, errors, skipped, tests = (
    int(suite.get(k)) for k in ('failures', 'errors', 'skipped', 'tests')
  )
  return dict(zip(keys, (tests - failed - errors - skipped, failed, errors, skipped), strict=True))


def accelerator_tests() -> dict:
  """``pytest -m accelerator`` in a fresh process, on this machine's accelerator."""
  with tempfile.TemporaryDirectory() as tmp:
    junit = pathlib.Path(tmp) / 'junit.xml'
    command = [sys.executable, '-m', 'pytest', '-m', 'accelerator', '-p', 'no:cacheprovider']
    start = time.perf_counter()
    done = subprocess.run(
      [*command, f'--junitxml={junit}'], cwd=ROOT, env=child_env(), capture_output=True, text=True
    )
    counts = junit_counts(junit)
  return {
    'command': 'python -m pytest -m accelerator',
    'returncode': done.returncode,
    **counts,
    'seconds': time.perf_counter() - start,
    'output_tail': (done.stdout + done.stderr)[-3000:],
  }


def data_flags(data_dir: pathlib.Path | None) -> list[str]:
  """train.py's flags for ``--data-dir``: jaxbn's cache and the IDX files both there."""
  if data_dir is None:
    return []
  return [f'--config.data.data_dir={data_dir}', f'--config.data.idx_dir={data_dir}']


def training(sizes: Sizes, data_dir: pathlib.Path | None) -> dict:
  """train.py with configs/lenet_bn.py for ``sizes.epochs`` epochs, in a fresh process."""
  with tempfile.TemporaryDirectory() as tmp:
    command = [
      'train.py', '--config', 'configs/lenet_bn.py', f'--config.num_epochs={sizes.epochs}',
      f'--config.data.num_train={sizes.num_train}', f'--config.data.num_test={sizes.num_test}',
      '--config.data.download=False', '--config.progress_bar=False', *data_flags(data_dir),
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(
      [sys.executable, *command, f'--workdir={tmp}/run'],
      cwd=ROOT, env=child_env(), capture_output=True, text=True,
    )  # fmt: skip
    records = workdir_lib.read_metrics(pathlib.Path(tmp) / 'run')
  last = records[-1] if records else {}
  return {
    'command': ' '.join(['python', *command]),
    'returncode': done.returncode,
    'seconds': time.perf_counter() - start,
    'epochs': len(records),
    'accuracy_floor': sizes.accuracy_floor,
    **{k: last.get(k) for k in ('train_loss', 'train_accuracy', 'test_accuracy')},
    'test_accuracy_each_epoch': [r['test_accuracy'] for r in records],
    'examples_per_sec_each_epoch': [r['examples_per_sec'] for r in records],
    'output_tail': (done.stdout + done.stderr)[-3000:],
  }


def load_data(sizes: Sizes, data_dir: pathlib.Path | None) -> data_lib.Dataset:
  """Fashion-MNIST from ``data_dir`` or jaxbn's usual places, never downloaded."""
  idx_dir = data_dir or data_lib.DEBIAN_IDX_DIR
  dataset = data_lib.load_fashion_mnist(data_dir, idx_dir, download=False)
  return dataset.subset(sizes.num_train, sizes.num_test)


def throughput(dataset: data_lib.Dataset, sizes: Sizes) -> dict:
  """Steady-state training examples/s of each of `VARIANTS` (median over rounds)."""
  variants = [
    throughput_lib.JaxVariant(norm, dataset, BATCH_SIZE, dtype=dtype) for norm, dtype in VARIANTS
  ]
  rates = throughput_lib.time_rounds(
    variants, sizes.warmup_steps, sizes.steps_per_round, sizes.rounds
  )
  rows = [
    {
      'variant': v.name,
      'norm': norm,
      'dtype': dtype or 'float32',
      'conv_impl': models.resolve_conv_impl('auto'),
      'examples_per_sec': statistics.median(rates[v.name]),
      'examples_per_sec_each_round': rates[v.name],
      'compile_seconds': v.compile_seconds,
    }
    for v, (norm, dtype) in zip(variants, VARIANTS, strict=True)
  ]
  return {
    'batch_size': BATCH_SIZE,
    'train_examples_on_device': len(dataset.train_labels),
    'steps_per_dispatch': variants[0].chunk,
    'steps_per_round': sizes.steps_per_round,
    'rounds': sizes.rounds,
    'target_examples_per_sec': TARGET,
    'reference_examples_per_sec': REFERENCE,
    'rows': rows,
  }


def checks(results: dict, sizes: Sizes) -> dict[str, bool]:
  """Whether the tests passed, training finished above its floor, throughput met `TARGET`."""
  tests, train = results['accelerator_tests'], results['training']
  accuracy = train['test_accuracy']
  return {
    'accelerator_tests': tests['returncode'] == 0
    and tests['failed'] == 0
    and (results['dry_run'] or tests['passed'] > 0),
    'training': train['returncode'] == 0
    and train['epochs'] == sizes.epochs
    and accuracy is not None
    and accuracy >= sizes.accuracy_floor,
    'throughput_target': results['throughput']['rows'][0]['examples_per_sec'] >= TARGET,
  }


def run_stages(args: argparse.Namespace, sizes: Sizes, dataset: data_lib.Dataset) -> dict:
  """Every stage in turn; the results file's fields."""
  start = time.perf_counter()
  results = {
    'dry_run': args.dry_run,
    'provenance': provenance.record(),
    'environment': environment(),
    'data': {
      'source': dataset.source,
      'train_examples': len(dataset.train_labels),
      'test_examples': len(dataset.test_labels),
      'tensorflow_loaded': 'tensorflow' in sys.modules,
    },
    'accelerator_tests': accelerator_tests(),
    'training': training(sizes, args.data_dir),
    'throughput': throughput(dataset, sizes),
  }
  results['checks'] = checks(results, sizes)
  results['ok'] = results['checks']['accelerator_tests'] and results['checks']['training']
  results['seconds'] = time.perf_counter() - start
  return results


def summary(results: dict) -> str:
  tests, train, speed = results['accelerator_tests'], results['training'], results['throughput']
  lines = [
    f'{"dry run on " if results["dry_run"] else ""}{", ".join(results["environment"]["devices"])}',
    f'accelerator tests: {tests["passed"]} passed, {tests["failed"]} failed, '
    f'{tests["errors"]} errors, {tests["skipped"]} skipped',
    f'training, {train["epochs"]} epochs: test acc {train["test_accuracy"] or 0:.3f} '
    f'(floor {train["accuracy_floor"]}) in {train["seconds"]:.0f} s',
  ]
  for row in speed['rows']:
    lines.append(f'  {row["variant"]:<32} {row["examples_per_sec"]:>12,.0f} examples/s')
  met = 'met' if results['checks']['throughput_target'] else 'not met'
  lines.append(
    f'jaxbn LeNet vs target {TARGET:,} examples/s: {met}; tests and training '
    f'{"passed" if results["ok"] else "FAILED"}; {results["seconds"]:.0f} s in all'
  )
  return '\n'.join(lines)


def main(argv=None) -> int:
  args = parse_args(argv)
  if not args.dry_run and jax.default_backend() == 'cpu':
    sys.exit(
      f'gpu_check: no GPU found: JAX {jax.__version__} sees only {jax.devices()}. Install JAX for '
      f'the GPU ({INSTALL}; README: Speed, GPU), or check this script on CPU with --dry-run '
      '(make gpu-check ARGS=--dry-run).'
    )
  sizes = DRY if args.dry_run else FULL
  if args.epochs:
    sizes = dataclasses.replace(sizes, epochs=args.epochs)
  try:
    dataset = load_data(sizes, args.data_dir)
  except data_lib.DataNotFoundError as e:
    sys.exit(f'gpu_check: {e}\nOr pass --data-dir FOLDER.')
  results = run_stages(args, sizes, dataset)
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(results, indent=1) + '\n')
  print(summary(results))
  print(f'wrote {args.json}')
  return 0 if results['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
