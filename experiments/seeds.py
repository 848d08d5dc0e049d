r"""Trains each config with several seeds through train.py and tabulates the medians.

  python experiments/seeds.py --configs lenet_bn lenet_bn_flax lenet --seeds 0 1 2 3 4 \
      --out experiments/results/seeds

Each run is a real `train.py` process with its own workdir under --out; the
table (Markdown, also saved as table.md and results.json) gives the median over
seeds of the final loss, train acc and test acc, the range of the final test
acc, and the median examples/s. Finished runs are reused, so the command can
be interrupted and repeated.
"""

import argparse
import json
import pathlib
import statistics
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def run(config: str, seed: int, out: pathlib.Path, extra: list[str]) -> list[dict]:
  workdir = out / f'{config}-seed{seed}'
  metrics = workdir / 'metrics.jsonl'
  cmd = [
    sys.executable,
    str(ROOT / 'train.py'),
    f'--config={ROOT / "configs" / (config + ".py")}',
    f'--workdir={workdir}',
    f'--config.seed={seed}',
    '--config.progress_bar=False',
    *extra,
  ]
  subprocess.run(cmd, check=True, cwd=ROOT)
  return [json.loads(line) for line in metrics.read_text().splitlines()]


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument('--configs', nargs='+', default=['lenet_bn', 'lenet_bn_flax', 'lenet'])
  parser.add_argument('--seeds', nargs='+', type=int, default=[0, 1, 2, 3, 4])
  parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'experiments/results/seeds')
  parser.add_argument('extra', nargs='*', help='more train.py flags, after --')
  args = parser.parse_args()
  args.out.mkdir(parents=True, exist_ok=True)
  results = {}
  for config in args.configs:
    results[config] = [run(config, seed, args.out, args.extra) for seed in args.seeds]
  rows = [
    '| config | loss | train acc | test acc (median) | test acc (min - max over seeds) '
    '| test acc range over epochs (median seed) | examples/s |',
    '|---|---|---|---|---|---|---|',
  ]
  summary = {}
  for config, runs in results.items():
    last = [r[-1] for r in runs]
    med = {
      k: statistics.median(x[k] for x in last)
      for k in ('train_loss', 'train_accuracy', 'test_accuracy')
    }
    tests = sorted(x['test_accuracy'] for x in last)
    median_run = sorted(runs, key=lambda r: r[-1]['test_accuracy'])[len(runs) // 2]
    per_epoch = [x['test_accuracy'] for x in median_run]
    speed = statistics.median(statistics.median(x['examples_per_sec'] for x in r) for r in runs)
    summary[config] = {
      'seeds': args.seeds,
      **med,
      'test_accuracy_per_seed': [x['test_accuracy'] for x in last],
      'examples_per_sec': speed,
      'per_epoch_test_accuracy': [[x['test_accuracy'] for x in r] for r in runs],
    }
    rows.append(
      f'| {config} | {med["train_loss"]:.3f} | {med["train_accuracy"]:.3f} | '
      f'{med["test_accuracy"]:.3f} | {tests[0]:.3f} - {tests[-1]:.3f} | '
      f'{min(per_epoch):.3f} - {max(per_epoch):.3f} | {speed:,.0f} |'
    )
  table = '\n'.join(rows) + '\n'
  (args.out / 'table.md').write_text(table)
  (args.out / 'results.json').write_text(json.dumps(summary, indent=1) + '\n')
  print(table)


if __name__ == '__main__':
  main()
