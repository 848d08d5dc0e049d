r"""Training throughput of jaxbn's LeNet and of the chapter's PyTorch LeNet, in one run.

  python benchmarks/throughput.py                      # about 2 minutes on 2 idle CPU cores
  python benchmarks/throughput.py --steps 10 --repeats 3 --skip-torch --epochs 0
  python benchmarks/throughput.py --out results/throughput   # results.json and table.md

Measures steady-state training examples/s at batch 256 on real Fashion-MNIST
(`d2l_lenet.data.load_fashion_mnist`) for jaxbn's LeNet with each normalisation
('jaxbn', 'flax', 'none'; configs/lenet_bn.py otherwise) and, when PyTorch is
importable, for D2L's PyTorch LeNet-BN with its from-scratch BatchNorm and with
nn.BatchNorm (benchmarks/torch_lenet.py, torch.set_num_threads(2)). Every
variant is compiled (JAX) or warmed up first; then ``--repeats`` rounds time
``--steps`` steps of each variant in turn (in reverse order every other round),
so that all see the same machine load, and a figure is the median over rounds.
Ratios are the medians of the per-round ratios, with their quartiles: on a
shared machine a round's load moves all variants of the round together. JAX
steps are dispatched as `d2l_lenet.trainer` dispatches them (``steps_per_dispatch``
steps per call, each call's metrics read while the next runs); PyTorch steps
are ``d2l.train_ch6``'s.

The 10-epoch wall time of each variant is extrapolated: compile time + 10 x
(one epoch of full batches at the measured rate + one evaluation of the test
set). With ``--epochs N`` (default 10) the scripts are also run end to end as
fresh processes and timed from start to end: ``train.py`` (configs/lenet_bn.py;
with an empty and then a filled persistent compilation cache) and, with
PyTorch, benchmarks/torch_lenet.py with D2L's DataLoader and with the data in
memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # for the configs/ package

from configs import lenet_bn  # noqa: E402
from d2l_lenet import data as data_lib  # noqa: E402
from d2l_lenet import parallel, provenance, settings, steps  # noqa: E402

JAX_NORMS = ('jaxbn', 'flax', 'none')
REFERENCE = 'torch nn.BatchNorm'
EPOCHS = 10


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description='Training throughput of jaxbn and PyTorch LeNets.')
  parser.add_argument('--steps', type=int, default=26, help='training steps per timed round')
  parser.add_argument('--repeats', type=int, default=27, help='timed rounds; the median is kept')
  parser.add_argument('--warmup', type=int, default=5, help='untimed steps before the rounds')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--skip-torch', action='store_true', help='time the JAX variants only')
  parser.add_argument(
    '--epochs', type=int, default=EPOCHS, help='epochs of the measured end-to-end run (0: skip)'
  )
  parser.add_argument(
    '--end-to-end-repeats', type=int, default=1, help='runs of each script; the median is kept'
  )
  parser.add_argument(
    '--out',
    type=pathlib.Path,
    help='write results.json (with provenance) and table.md (the README tables) here',
  )
  return parser.parse_args(argv)


class JaxVariant:
  """jaxbn's LeNet with one normalisation, compiled and dispatched as `d2l_lenet.trainer` does."""

  framework = 'jax'

  def __init__(
    self,
    norm: str,
    dataset: data_lib.Dataset,
    batch_size: int,
    api: str = 'linen',
    dtype: str | None = None,
  ):
    self.name = f'jaxbn LeNet, norm={norm}' + (' (NNX)' if api == 'nnx' else '')
    config = lenet_bn.get_config()
    config.norm, config.api = norm, api
    config.batch_size = batch_size
    self.batch_size = batch_size
    model = settings.build_model(config)
    if dtype:  # the layers' computation dtype (linen), e.g. 'bfloat16'
      self.name += f', {dtype}'
      model = model.clone(dtype=jnp.dtype(dtype))
    self.state = steps.create_train_state(jax.random.key(config.seed), model, config.learning_rate)
    self.images, self.labels = jax.device_put((dataset.train_images, dataset.train_labels))
    steps_per_epoch = len(dataset.train_labels) // batch_size
    self.chunk = steps.steps_per_dispatch(steps_per_epoch, config.steps_per_dispatch)
    indices = jax.ShapeDtypeStruct((self.chunk, batch_size), jnp.int32)
    start = time.perf_counter()
    self.train = (
      parallel.make_train_steps(parallel.make_mesh(jax.devices()[:1]))
      .lower(self.state, self.images, self.labels, indices)
      .compile()
    )
    self.compile_seconds = time.perf_counter() - start
    self.test = jax.device_put(
      steps.pad_and_batch(dataset.test_images, dataset.test_labels, config.eval_batch_size)
    )
    # Compiled on first use: `measure` keeps the fastest of three evaluations.
    self.evaluate = jax.jit(steps.evaluate)
    self.rng = jax.random.key(config.seed)

  def run(self, num_steps: int) -> tuple[float, int]:
    """Trains ``num_steps`` steps, rounded up to whole dispatches; returns (wall seconds, steps)."""
    self.rng, rng = jax.random.split(self.rng)
    dispatches = -(-num_steps // self.chunk)
    batches = steps.shuffled_batches(rng, len(self.labels), self.batch_size)
    batches = batches[: dispatches * self.chunk].reshape(dispatches, self.chunk, -1)
    jax.block_until_ready(batches)
    start = time.perf_counter()
    pending = None
    for c in range(dispatches):
      self.state, metrics = self.train(self.state, self.images, self.labels, batches[c])
      if pending is not None:
        jax.device_get(pending)
      pending = metrics
    jax.device_get(pending)
    return time.perf_counter() - start, dispatches * self.chunk

  def eval_seconds(self) -> float:
    start = time.perf_counter()
    jax.device_get(self.evaluate(self.state, *self.test))
    return time.perf_counter() - start


class TorchVariant:
  """D2L's PyTorch LeNet-BN (benchmarks/torch_lenet.py), trained as ``d2l.train_ch6`` does."""

  framework = 'torch'
  compile_seconds = 0.0

  def __init__(self, norm: str, dataset: data_lib.Dataset, batch_size: int):
    import torch
    import torch_lenet

    self.torch = torch
    self.name = {'scratch': 'torch LeNet, D2L BatchNorm', 'nn': REFERENCE}[norm]
    torch.manual_seed(0)
    self.trainer = torch_lenet.Trainer(torch_lenet.lenet(norm), lr=1.0)
    self.images = torch_lenet.to_nchw(dataset.train_images)
    self.labels = torch.from_numpy(dataset.train_labels).long()
    self.test_images = torch_lenet.to_nchw(dataset.test_images)
    self.batch_size = batch_size

  def run(self, num_steps: int) -> tuple[float, int]:
    """Trains ``num_steps`` steps; returns (wall seconds, steps)."""
    order = self.torch.randperm(len(self.labels))
    batches = order[: num_steps * self.batch_size].reshape(num_steps, self.batch_size)
    self.trainer.net.train()
    start = time.perf_counter()
    for idx in batches:
      self.trainer.step(self.images[idx], self.labels[idx])
    return time.perf_counter() - start, num_steps

  def eval_seconds(self) -> float:
    """``d2l.evaluate_accuracy_gpu``'s forward passes over the test set in batches."""
    net = self.trainer.net.eval()
    start = time.perf_counter()
    with self.torch.no_grad():
      for images in self.test_images.split(self.batch_size):
        net(images).argmax(dim=1)
    return time.perf_counter() - start


def torch_available() -> bool:
  try:
    import torch
  except ImportError:
    return False
  torch.set_num_threads(2)
  return True


def end_to_end(epochs: int, batch_size: int, with_torch: bool, repeats: int) -> list[dict]:
  """Wall seconds, start to end, of the scripts that train LeNet-BN for ``epochs`` epochs.

  ``train.py`` with configs/lenet_bn.py, first with an empty persistent
  compilation cache and then again with the cache it filled; and, with
  PyTorch, benchmarks/torch_lenet.py with D2L's DataLoader and with the data
  held in memory. Each is a fresh process that loads the data, evaluates the
  test set after every epoch, and (train.py) writes checkpoints, metrics and
  the plot. The four run in turn ``repeats`` times; the median is kept.
  """
  jaxbn = [
    sys.executable, 'train.py', '--config', 'configs/lenet_bn.py',
    f'--config.num_epochs={epochs}', f'--config.batch_size={batch_size}',
    '--config.progress_bar=False',
  ]  # fmt: skip
  torch_script = [
    sys.executable, 'benchmarks/torch_lenet.py', f'--epochs={epochs}', f'--batch-size={batch_size}'
  ]  # fmt: skip
  runs = {
    'train.py, compilation cache empty': (jaxbn, 'cold'),
    'train.py, compilation cache filled': (jaxbn, 'warm'),
  }
  if with_torch:
    runs['torch_lenet.py, D2L DataLoader'] = ([*torch_script, '--loader=d2l'], None)
    runs['torch_lenet.py, data in memory'] = ([*torch_script, '--loader=memory'], None)
  seconds = {name: [] for name in runs}
  accuracy = {}
  with tempfile.TemporaryDirectory() as tmp:
    for repeat in range(repeats):
      # The warm run reuses the cache its cold run of this repeat filled.
      env = {**os.environ, 'JAX_COMPILATION_CACHE_DIR': f'{tmp}/xla-{repeat}'}
      for name, (command, workdir) in runs.items():
        if workdir:
          command = [*command, f'--workdir={tmp}/{workdir}-{repeat}']
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        seconds[name].append(time.perf_counter() - start)
        if done.returncode:
          raise RuntimeError(f'{" ".join(command)} failed:\n{done.stderr[-2000:]}')
        accuracy[name] = float(re.findall(r'test acc ([0-9.]+)', done.stdout)[-1])
  return [
    {
      'run': name,
      'command': ' '.join(command[1:]),
      'seconds': statistics.median(seconds[name]),
      'seconds_each_repeat': seconds[name],
      'test_accuracy': accuracy[name],
    }
    for name, (command, _) in runs.items()
  ]


def device_description() -> str:
  device = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
    cpu = next((line.split(':', 1)[1].strip() for line in f if line.startswith('model name')), cpu)
  return f'{device.platform} ({cpu}, {os.cpu_count()} cores)'


def time_rounds(variants: list, warmup: int, steps: int, repeats: int) -> dict[str, list[float]]:
  """Examples/s of each variant in each of ``repeats`` rounds of ``steps`` steps, after warm-up.

  The variants take turns, in reverse order every other round, so that changes
  in the machine's load hit them alike.
  """
  for variant in variants:
    variant.run(warmup)
  rates = {v.name: [] for v in variants}
  for round_index in range(repeats):
    for variant in variants[:: -1 if round_index % 2 else 1]:
      seconds, done = variant.run(steps)
      rates[variant.name].append(done * variant.batch_size / seconds)
  return rates


def measure(args: argparse.Namespace) -> dict:
  dataset = data_lib.load_fashion_mnist()
  steps_per_epoch = len(dataset.train_labels) // args.batch_size
  variants = [JaxVariant(norm, dataset, args.batch_size) for norm in JAX_NORMS]
  variants.append(JaxVariant('jaxbn', dataset, args.batch_size, api='nnx'))
  torch_version = None
  if not args.skip_torch and torch_available():
    import torch

    torch_version = torch.__version__
    variants += [TorchVariant(norm, dataset, args.batch_size) for norm in ('scratch', 'nn')]
  load_before = os.getloadavg()
  rates = time_rounds(variants, args.warmup, args.steps, args.repeats)
  load_after = os.getloadavg()

  rows = []
  for variant in variants:
    rate = statistics.median(rates[variant.name])
    eval_seconds = min(variant.eval_seconds() for _ in range(3))
    epoch_seconds = steps_per_epoch * args.batch_size / rate
    rows.append({
      'variant': variant.name,
      'framework': variant.framework,
      'examples_per_sec': rate,
      'examples_per_sec_each_round': rates[variant.name],
      'compile_seconds': variant.compile_seconds,
      'eval_seconds': eval_seconds,
      'ten_epoch_seconds_extrapolated': (
        variant.compile_seconds + EPOCHS * (epoch_seconds + eval_seconds)
      ),
    })  # fmt: skip
  for row in rows:
    row['ratio_to_torch_nn_batchnorm'] = paired_ratio(rates, row['variant'], REFERENCE)
  return {
    'provenance': provenance.record(),
    'device': device_description(),
    'jax_version': jax.__version__,
    'torch_version': torch_version,
    'torch_threads': 2 if torch_version else None,
    'batch_size': args.batch_size,
    'steps_per_round': args.steps,
    'rounds': args.repeats,
    'load_average_before_after': [load_before[0], load_after[0]],
    'rows': rows,
    'jaxbn_over_flax': paired_ratio(rates, 'jaxbn LeNet, norm=jaxbn', 'jaxbn LeNet, norm=flax'),
    'nnx_over_linen': paired_ratio(
      rates, 'jaxbn LeNet, norm=jaxbn (NNX)', 'jaxbn LeNet, norm=jaxbn'
    ),
    'end_to_end_epochs': args.epochs,
    'end_to_end': (
      end_to_end(args.epochs, args.batch_size, torch_version is not None, args.end_to_end_repeats)
      if args.epochs
      else None
    ),
  }


def paired_ratio(rates: dict, name: str, reference: str) -> dict | None:
  """Median and quartiles of ``name``'s rate over ``reference``'s, round by round."""
  if reference not in rates:
    return None
  return ratio_summary([a / b for a, b in zip(rates[name], rates[reference], strict=True)])


def ratio_summary(ratios: list[float]) -> dict:
  """The median and quartiles of paired ratios."""
  quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
  return {'median': statistics.median(ratios), 'quartiles': [quartiles[0], quartiles[2]]}


def format_ratio(ratio: dict | None) -> str:
  if ratio is None:
    return '-'
  low, high = ratio['quartiles']
  return f'{ratio["median"]:.2f}x ({low:.2f}-{high:.2f})'


def print_table(results: dict) -> None:
  print(f'device: {results["device"]}; jax {results["jax_version"]}', end='')
  if results['torch_version']:
    print(f', torch {results["torch_version"]} ({results["torch_threads"]} threads)', end='')
  load = results['load_average_before_after']
  print(
    f'\nbatch {results["batch_size"]}, median of {results["rounds"]} interleaved rounds of '
    f'{results["steps_per_round"]} steps; 1-min load average {load[0]:.1f} -> {load[1]:.1f}\n'
    'ratios: median of the per-round ratios (quartiles)\n'
  )
  header = (
    f'{"variant":<30} {"examples/s":>10} {"vs " + REFERENCE:>22} {"compile s":>9} '
    f'{"10-epoch s*":>11}'
  )
  print(header)
  print('-' * len(header))
  for row in results['rows']:
    ratio = row['ratio_to_torch_nn_batchnorm']
    print(
      f'{row["variant"]:<30} {row["examples_per_sec"]:>10,.0f} '
      f'{format_ratio(ratio):>22} {row["compile_seconds"]:>9.1f} '
      f'{row["ten_epoch_seconds_extrapolated"]:>11.1f}'
    )
  print(
    '\n* extrapolated: compile + 10 x (one epoch at the median rate + one test-set evaluation).'
    f'\njaxbn BN / flax BN throughput: {format_ratio(results["jaxbn_over_flax"])}'
    f'\nNNX / linen throughput (jaxbn BN): {format_ratio(results["nnx_over_linen"])}'
  )
  e2e = results['end_to_end']
  if e2e:
    epochs = results['end_to_end_epochs']
    repeats = len(e2e[0]['seconds_each_repeat'])
    print(
      f'\nmeasured end to end, {epochs} epochs, each a fresh process (seconds from start to end, '
      f'median of {repeats}):'
    )
    reference = next((r['seconds'] for r in e2e if 'DataLoader' in r['run']), None)
    for run in e2e:
      ratio = f'  {reference / run["seconds"]:.2f}x faster than D2L' if reference else ''
      print(f'  {run["run"]:<36} {run["seconds"]:6.1f}  test acc {run["test_accuracy"]}{ratio}')


def markdown(results: dict) -> str:
  """The README's speed tables, with the commit and CPU they were measured at."""
  record = results['provenance']
  lines = [
    f'Measured at commit {record["commit"][:12]} on {record["cpu_description"]}; '
    f'jax {record["packages"]["jax"]}, torch {record["packages"]["torch"]}; '
    f'{results["rounds"]} rounds of {results["steps_per_round"]} steps, batch '
    f'{results["batch_size"]}.',
    '',
    '| variant | examples/s | vs PyTorch `nn.BatchNorm` (quartiles) | compile (s) |',
    '|---|---|---|---|',
  ]
  for row in results['rows']:
    lines.append(
      f'| {row["variant"]} | {row["examples_per_sec"]:,.0f} | '
      f'{format_ratio(row["ratio_to_torch_nn_batchnorm"])} | {row["compile_seconds"]:.1f} |'
    )
  lines += [
    '',
    f'jaxbn BN / Flax BN: {format_ratio(results["jaxbn_over_flax"])}; '
    f'NNX / linen (jaxbn BN): {format_ratio(results["nnx_over_linen"])}.',
  ]
  if results['end_to_end']:
    lines += ['', '| script, 10 epochs end to end | seconds | test acc |', '|---|---|---|']
    for run in results['end_to_end']:
      lines.append(f'| {run["run"]} | {run["seconds"]:.1f} | {run["test_accuracy"]} |')
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  args = parse_args(argv)
  results = measure(args)
  print_table(results)
  if args.out:
    write_results(args.out, results, markdown(results))


def write_results(out: pathlib.Path, results: dict, table: str) -> None:
  """``out``/results.json (the figures and their provenance) and ``out``/table.md."""
  out.mkdir(parents=True, exist_ok=True)
  (out / 'results.json').write_text(json.dumps(results, indent=2) + '\n')
  (out / 'table.md').write_text(table)
  print(f'wrote {out}/results.json and table.md')


if __name__ == '__main__':
  main()
