r"""Trains each config with several seeds and tabulates the medians: the README's results table.

  python experiments/seeds.py                  # make seeds: every row, 5 seeds each
  python experiments/seeds.py --configs lenet_bn --seeds 0 1

A config is a file of configs/ (trained by ``train.py``) or one of the chapter's
PyTorch LeNets, ``torch_scratch`` (its from-scratch ``batch_norm``) and
``torch_nn`` (``nn.BatchNorm2d/1d``), trained by benchmarks/torch_lenet.py with
the data held in memory. Each run is a fresh process with its own workdir under
``--workdirs`` (by default one folder per commit); a finished run is reused, so
the command can be interrupted and repeated. The table (median over seeds of
the final loss, train acc and test acc, the range of the final test acc over
seeds and over the epochs of the median seed, and the median examples/s of the
epochs) is printed and written to ``--out``/table.md, and the figures to
``--out``/results.json, each config's with the command, commit, CPU and
package versions of its runs (`d2l_lenet.provenance`): running some configs
updates their rows and keeps the others'.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2l_lenet import provenance  # noqa: E402

TORCH = {'torch_scratch': 'scratch', 'torch_nn': 'nn'}
CONFIGS = ['lenet_bn', 'lenet_bn_flax', 'lenet_bn_nnx', 'lenet', 'torch_scratch', 'torch_nn']
EPOCHS = 10


def command(config: str, seed: int, workdir: pathlib.Path) -> list[str]:
  if config in TORCH:
    return [
      sys.executable, str(ROOT / 'benchmarks/torch_lenet.py'), f'--norm={TORCH[config]}',
      '--loader=memory', f'--seed={seed}', f'--epochs={EPOCHS}',
      f'--metrics={workdir / "metrics.jsonl"}',
    ]  # fmt: skip
  return [
    sys.executable, str(ROOT / 'train.py'), f'--config={ROOT / "configs" / (config + ".py")}',
    f'--workdir={workdir}', f'--config.seed={seed}', f'--config.num_epochs={EPOCHS}',
    '--config.progress_bar=False',
  ]  # fmt: skip


def run(config: str, seed: int, workdirs: pathlib.Path) -> list[dict]:
  """The per-epoch records of one run (trained now unless a finished run is there)."""
  workdir = workdirs / f'{config}-seed{seed}'
  metrics = workdir / 'metrics.jsonl'
  read = lambda: [json.loads(line) for line in metrics.read_text().splitlines()]
  if not (metrics.exists() and len(read()) == EPOCHS):
    subprocess.run(command(config, seed, workdir), check=True, cwd=ROOT)
  return read()


def summarize(runs: list[list[dict]]) -> dict:
  last = [r[-1] for r in runs]
  median_run = sorted(runs, key=lambda r: r[-1]['test_accuracy'])[len(runs) // 2]
  return {
    **{k: statistics.median(x[k] for x in last) for k in ('train_loss', 'train_accuracy')},
    'test_accuracy': statistics.median(x['test_accuracy'] for x in last),
    'test_accuracy_per_seed': [x['test_accuracy'] for x in last],
    'median_seed_test_accuracy_per_epoch': [x['test_accuracy'] for x in median_run],
    'examples_per_sec': statistics.median(x['examples_per_sec'] for r in runs for x in r),
    'per_epoch_test_accuracy': [[x['test_accuracy'] for x in r] for r in runs],
  }


def table(summary: dict) -> str:
  rows = [
    '| config | loss | train acc | test acc (median) | test acc, seeds (min - max) '
    '| test acc over epochs 1-10 (median seed) | examples/s |',
    '|---|---|---|---|---|---|---|',
  ]
  for config, s in summary.items():
    seeds, epochs = s['test_accuracy_per_seed'], s['median_seed_test_accuracy_per_epoch']
    rows.append(
      f'| {config} | {s["train_loss"]:.3f} | {s["train_accuracy"]:.3f} | '
      f'{s["test_accuracy"]:.3f} | {min(seeds):.3f} - {max(seeds):.3f} | '
      f'{min(epochs):.3f} - {max(epochs):.3f} | {s["examples_per_sec"]:,.0f} |'
    )
  # The median over seeds, epoch by epoch: how the test accuracy swings.
  rows += ['', '| median test acc, epoch | ' + ' | '.join(map(str, range(1, EPOCHS + 1))) + ' |']
  rows.append('|---' * (EPOCHS + 1) + '|')
  for config, s in summary.items():
    per_epoch = zip(*s['per_epoch_test_accuracy'], strict=True)
    medians = [statistics.median(epoch) for epoch in per_epoch]
    rows.append(f'| {config} | ' + ' | '.join(f'{m:.3f}' for m in medians) + ' |')
  return '\n'.join(rows) + '\n'


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument('--configs', nargs='+', default=CONFIGS)
  parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
  parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'results/seeds')
  parser.add_argument(
    '--workdirs', type=pathlib.Path, help='default: workdirs/seeds-<commit>, runs of this commit'
  )
  args = parser.parse_args(argv)
  record = provenance.record()
  args.workdirs = args.workdirs or ROOT / 'workdirs' / f'seeds-{(record["commit"] or "")[:12]}'
  summary = {
    config: {
      'seeds': args.seeds,
      'epochs': EPOCHS,
      **summarize([run(config, s, args.workdirs) for s in args.seeds]),
    }
    for config in args.configs
  }
  # Each config's entry names the command, commit and machine of its runs; the
  # configs not run now keep theirs.
  path = args.out / 'results.json'
  results = json.loads(path.read_text()) if path.exists() else {}
  results.update({config: {'provenance': record, **s} for config, s in summary.items()})
  order = [c for c in CONFIGS if c in results] + [c for c in results if c not in CONFIGS]
  results = {config: results[config] for config in order}
  text = table(results)
  args.out.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(results, indent=1) + '\n')
  (args.out / 'table.md').write_text(text)
  print(text)


if __name__ == '__main__':
  main()
