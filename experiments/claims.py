r"""The chapter's claims, measured: BN allows a high learning rate; BN needs large enough batches.

  python experiments/claims.py                 # both studies, into results/claims
  python experiments/claims.py --study batch_size --epochs 2

Each run is a real `train.py` process (configs/lenet_bn.py with overrides) in
its own workdir under --workdirs; finished runs are reused (train.py resumes
them). Writes `<study>.md` (the README's table, with the commit and CPU) and
`results.json` (every run's per-epoch records, with `d2l_lenet.provenance`) into --out.

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
sys.path.insert(0, str(ROOT))

from d2l_lenet import provenance  # noqa: E402


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


def learning_rate_table(runs: dict) -> list[str]:
  cell = lambda r: f'{r[-1]["test_accuracy"]:.3f} (loss {r[-1]["train_loss"]:.3f})'
  return [
    '| | lr 1.0 | lr 0.1 |',
    '|---|---|---|',
    f'| LeNet with BN (`jaxbn`) | {cell(runs["jaxbn-lr1.0"])} | {cell(runs["jaxbn-lr0.1"])} |',
    f'| LeNet without BN | {cell(runs["none-lr1.0"])} | {cell(runs["none-lr0.1"])} |',
  ]


def batch_size_table(runs: dict) -> list[str]:
  sizes = (2, 4, 16, 64, 256)
  cell = lambda r: f'{r[-1]["test_accuracy"]:.3f} ({r[-1]["train_accuracy"]:.2f})'
  ghost = [cell(runs[f'ghost-v{b}']) for b in sizes[:-1]] + ['(= plain)']
  return [
    '| statistics over | ' + ' | '.join(map(str, sizes)) + ' |',
    '|---' * (len(sizes) + 1) + '|',
    '| plain BN, batch = that size | '
    + ' | '.join(cell(runs[f'plain-b{b}']) for b in sizes)
    + ' |',
    '| ghost BN, batch 256, virtual batches of that size (lr 1.0) | ' + ' | '.join(ghost) + ' |',
    '| batch renorm (rmax 3, dmax 5, widened over epoch 1), batch = that size | '
    + ' | '.join(cell(runs[f'renorm-b{b}']) for b in sizes)
    + ' |',
  ]


TABLES = {'learning_rate': learning_rate_table, 'batch_size': batch_size_table}
CELLS = {
  'learning_rate': 'test accuracy at the last epoch (final training loss)',
  'batch_size': 'lr = batch / 256; test accuracy at the last epoch (training accuracy)',
}


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument('--study', choices=sorted(STUDIES), nargs='+', default=sorted(STUDIES))
  parser.add_argument('--epochs', type=int, default=None, help='default: 10 (lr), 2 (batch size)')
  parser.add_argument('--workdirs', type=pathlib.Path, default=ROOT / 'workdirs/claims')
  parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'results/claims')
  args = parser.parse_args(argv)
  args.out.mkdir(parents=True, exist_ok=True)
  path = args.out / 'results.json'
  results = json.loads(path.read_text()) if path.exists() else {}
  for study in args.study:
    epochs = args.epochs or (10 if study == 'learning_rate' else 2)
    runs = {
      name: train(name, overrides, args.workdirs / study)
      for name, overrides in STUDIES[study](epochs)
    }
    record = provenance.record()
    results[study] = {'provenance': record, 'epochs': epochs, 'runs': runs}
    table = [
      f'Measured at commit {record["commit"][:12]} on {record["cpu_description"]}; one seed, '
      f'{epochs} epochs; {CELLS[study]}.',
      '',
      *TABLES[study](runs),
    ]
    (args.out / f'{study}.md').write_text('\n'.join(table) + '\n')
    print('\n'.join(table), flush=True)
  path.write_text(json.dumps(results, indent=1) + '\n')


if __name__ == '__main__':
  main()
