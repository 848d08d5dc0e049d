r"""The chapter's claims, measured: BN allows a high learning rate; BN needs large enough batches.

  python experiments/claims.py --out experiments/results/claims            # both studies
  python experiments/claims.py --study batch_size --epochs 2

Each run is a real `train.py` process (configs/lenet_bn.py with overrides) in
its own workdir under --out; finished runs are reused (train.py resumes them).
Writes `<study>.md` (a Markdown table) and `<study>.json` next to the runs.

* learning_rate: LeNet with and without BN at lr 1.0 and 0.1, 10 epochs.
* batch_size: batch sizes 2, 4, 16, 64, 256 with plain BN (the batch is the
  normalisation batch), ghost BN (batch 256, statistics over virtual batches of
  that size: the gradient batch stays large) and batch renormalization (rmax 3,
  dmax 5, widened over the first epoch), at lr = 1.0 * batch / 256 (linear
  scaling, so every run takes steps of the same expected size per example).
"""

import argparse
import json
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def learning_rate_runs(epochs):
  for norm in ('jaxbn', 'none'):
    for lr in (1.0, 0.1):
      yield f'{norm}-lr{lr}', {'norm': norm, 'learning_rate': lr, 'num_epochs': epochs}


def batch_size_runs(epochs):
  for batch in (2, 4, 16, 64, 256):
    lr = batch / 256
    base = {'num_epochs': epochs, 'learning_rate': lr}
    yield f'plain-b{batch}', {**base, 'batch_size': batch}
    if batch < 256:
      yield (
        f'ghost-v{batch}',
        {**base, 'learning_rate': 1.0, 'batch_size': 256, 'bn.virtual_batch_size': batch},
      )
    warmup = 60000 // batch
    yield (
      f'renorm-b{batch}',
      {
        **base,
        'batch_size': batch,
        'bn.renorm_rmax': 3.0,
        'bn.renorm_dmax': 5.0,
        'bn.renorm_warmup_steps': warmup,
      },
    )


STUDIES = {'learning_rate': learning_rate_runs, 'batch_size': batch_size_runs}


def train(name, overrides, out):
  workdir = out / name
  flags = [f'--config.{k}={v}' for k, v in overrides.items()]
  cmd = [
    sys.executable,
    str(ROOT / 'train.py'),
    f'--config={ROOT / "configs/lenet_bn.py"}',
    f'--workdir={workdir}',
    '--config.progress_bar=False',
    *flags,
  ]
  print(' '.join(cmd[1:]), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  return [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument('--study', choices=sorted(STUDIES), nargs='+', default=sorted(STUDIES))
  parser.add_argument('--epochs', type=int, default=None, help='default: 10 (lr), 2 (batch size)')
  parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'experiments/results/claims')
  args = parser.parse_args()
  for study in args.study:
    epochs = args.epochs or (10 if study == 'learning_rate' else 2)
    out = args.out / study
    rows = [
      '| run | settings | loss | train acc | test acc | test acc per epoch |',
      '|---|---|---|---|---|---|',
    ]
    results = {}
    for name, overrides in STUDIES[study](epochs):
      records = train(name, overrides, out)
      results[name] = {'overrides': overrides, 'records': records}
      last = records[-1]
      settings = ', '.join(f'{k}={v}' for k, v in overrides.items() if k != 'num_epochs')
      per_epoch = ' '.join(f'{r["test_accuracy"]:.3f}' for r in records)
      rows.append(
        f'| {name} | {settings} | {last["train_loss"]:.3f} | {last["train_accuracy"]:.3f} | '
        f'{last["test_accuracy"]:.3f} | {per_epoch} |'
      )
    table = f'{study}, {epochs} epochs\n\n' + '\n'.join(rows) + '\n'
    (args.out / f'{study}.md').write_text(table)
    (args.out / f'{study}.json').write_text(json.dumps(results, indent=1) + '\n')
    print(table, flush=True)


if __name__ == '__main__':
  main()
