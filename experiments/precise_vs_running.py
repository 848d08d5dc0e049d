r"""Test accuracy per epoch with running averages vs precise statistics, over seeds.

  python experiments/seeds.py --configs lenet_bn_precise --workdirs workdirs/precise \
      --out results/precise
  python experiments/precise_vs_running.py workdirs/precise results/precise

Each run of configs/lenet_bn_precise.py evaluates twice per epoch: with the
EMA running averages (test_accuracy_running, what the chapter reports) and
with precise statistics (test_accuracy). Reads the runs' workdirs in the first
folder; writes precise.md (the README's table, with the commit and CPU of
the runs from the results.json that seeds.py wrote there) and precise.png into
the second.
"""

import argparse
import json
import pathlib
import statistics


def main(workdirs: pathlib.Path, out: pathlib.Path):
  runs = [
    [json.loads(line) for line in (d / 'metrics.jsonl').read_text().splitlines()]
    for d in sorted(workdirs.glob('lenet_bn_precise-seed*'))
  ]
  runs = [r for r in runs if len(r) == len(runs[0])]
  epochs = [r['epoch'] for r in runs[0]]
  series = {}
  for key, label in (
    ('test_accuracy_running', 'running averages (the chapter)'),
    ('test_accuracy', 'precise'),
  ):
    per_epoch = list(zip(*[[x[key] for x in r] for r in runs], strict=True))
    series[label] = [statistics.median(e) for e in per_epoch]
  provenance = json.loads((out / 'results.json').read_text())['lenet_bn_precise']['provenance']
  final = {
    label: sorted(r[-1][key] for r in runs)
    for key, label in (('test_accuracy_running', 'running'), ('test_accuracy', 'precise'))
  }
  rows = [
    f'Measured at commit {provenance["commit"][:12]} on {provenance["cpu_description"]}; '
    f'median over {len(runs)} seeds per epoch; at epoch {epochs[-1]} the seeds give '
    f'{final["precise"][0]:.3f} - {final["precise"][-1]:.3f} with precise statistics and '
    f'{final["running"][0]:.3f} - {final["running"][-1]:.3f} with the running averages.',
    '',
    '| statistics | ep ' + ' | '.join(str(e) for e in epochs) + ' | range, epochs 5-10 |',
    '|---' * (len(epochs) + 2) + '|',
  ]
  for label, values in series.items():
    cells = [f'{v:.3f}' for v in values]
    if label.startswith('precise'):
      cells[-1] = f'**{cells[-1]}**'
    rows.append(
      f'| {label} | ' + ' | '.join(cells) + f' | {min(values[4:]):.3f} - {max(values[4:]):.3f} |'
    )
  (out / 'precise.md').write_text('\n'.join(rows) + '\n')
  print('\n'.join(rows))

  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
  for r in runs:
    ax.plot(epochs, [x['test_accuracy_running'] for x in r], color='C1', alpha=0.3, lw=0.8)
    ax.plot(epochs, [x['test_accuracy'] for x in r], color='C0', alpha=0.3, lw=0.8)
  ax.plot(
    epochs,
    series['running averages (the chapter)'],
    color='C1',
    lw=2,
    label='running averages (EMA)',
  )
  ax.plot(epochs, series['precise'], color='C0', lw=2, label='precise statistics')
  ax.set_xlabel('epoch')
  ax.set_ylabel('test accuracy')
  ax.set_title(f'LeNet-BN, lr 1.0: {len(runs)} seeds (thin) and median (thick)', fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(out / 'precise.png')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('workdirs', type=pathlib.Path, help="the runs' workdirs (seeds.py's)")
  parser.add_argument('out', type=pathlib.Path, help='where precise.md and precise.png go')
  args = parser.parse_args()
  main(args.workdirs, args.out)
