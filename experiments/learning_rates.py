r"""A learning-rate sweep, LeNet with and without BN: where each stalls and where it diverges.

  python experiments/learning_rates.py            # into results/why/learning_rates
  python experiments/learning_rates.py --quick    # a tiny run (the test suite's)

The chapter: BN allows a "much higher" learning rate and accelerates
convergence. LeNet with BN (`jaxbn.BatchNorm`, D2L's momentum and epsilon) and
without trains by SGD, batch 256, at each of --lrs (log-spaced, 0.01 to 100)
for --epochs, with several seeds. Each run is called

* diverged: a training loss was not finite (the run stops there);
* unstable: its last epoch's mean training loss is above 2.5, worse than a
  uniform guess (ln 10 = 2.30): the steps overshoot;
* stalled: that loss is between 2.0 and 2.5: it has not left the start in
  this budget;
* trained: otherwise.

Writes results.json (every epoch of every run, with the commit and CPU),
table.md and learning_rates.png (test accuracy after the first and the last
epoch against the learning rate) into --out.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from d2l_lenet import models, study  # noqa: E402

MODELS = {'BN': models.LeNet(), 'no BN': models.LeNet(norm=None)}
LEARNING_RATES = tuple(float(f'{x:.3g}') for x in np.logspace(-2, 2, 9))
STALLED_LOSS = 2.0
UNSTABLE_LOSS = 2.5
OUTCOMES = ('diverged', 'unstable', 'stalled', 'trained')


def outcome(run: dict) -> str:
  """One of `OUTCOMES` (see the module docstring)."""
  if run['diverged']:
    return 'diverged'
  loss = run['epochs'][-1]['train_loss']
  return 'unstable' if loss > UNSTABLE_LOSS else 'stalled' if loss > STALLED_LOSS else 'trained'


def reached(run: dict, epoch: int) -> bool:
  """Whether ``run`` finished epoch ``epoch`` (an index; -1: the last) without diverging."""
  last = len(run['epochs']) - 1
  index = last if epoch == -1 else epoch
  return index < last or (index == last and not run['diverged'])


def cell(seeds: list[dict], epoch: int) -> str:
  """The median test accuracy after ``epoch`` (-1: the last) and, then, how many seeds failed."""
  alive = [r for r in seeds if reached(r, epoch)]
  if not alive:
    return 'diverged'
  acc = f'{study.median(r["epochs"][epoch]["test_accuracy"] for r in alive):.3f}'
  if epoch != -1:
    return acc
  outcomes = [outcome(r) for r in seeds]
  note = ', '.join(f'{outcomes.count(o)}/{len(seeds)} {o}' for o in OUTCOMES[:-1] if o in outcomes)
  return acc + (f' ({note})' if note else '')


def table(runs: dict, lrs, epochs: int) -> list[str]:
  lines = [
    '| LeNet | ' + ' | '.join(f'lr {lr:g}' for lr in lrs) + ' |',
    '|---' * (len(lrs) + 1) + '|',
  ]
  for model in MODELS:
    for epoch, label in ((0, 'after epoch 1'), (-1, f'after epoch {epochs}')):
      cells = ' | '.join(cell(runs[model][str(lr)], epoch) for lr in lrs)
      lines.append(f'| {model}, {label} | {cells} |')
  return lines


def plot(runs: dict, lrs, out: pathlib.Path) -> None:
  fig, axes = study.figure(1, 2, size=(4.2, 3.0))
  for ax, which, title in (
    (axes[0, 0], 0, 'after epoch 1'),
    (axes[0, 1], -1, 'after the last epoch'),
  ):
    for color, model in zip(('C0', 'C3'), MODELS, strict=True):
      med = []
      for lr in lrs:
        seeds = runs[model][str(lr)]
        acc = [r['epochs'][which]['test_accuracy'] if reached(r, which) else 0.0 for r in seeds]
        ax.scatter([lr] * len(acc), acc, color=color, s=8, alpha=0.5)
        med.append(float(np.median(acc)))
      ax.plot(lrs, med, color=color, marker='o', ms=3, label=f'LeNet, {model}')
    ax.set_xscale('log')
    ax.set_xlabel('learning rate')
    ax.set_ylabel('test accuracy (diverged: 0)')
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=8)
  study.save_figure(fig, out / 'learning_rates.png')


def main(argv=None):
  parser = study.arguments(
    __doc__, 'learning_rates', epochs=3, seeds=[0, 1, 2], quick='lrs 0.1 and 10, 1 epoch, seed 0'
  )
  parser.add_argument('--lrs', type=float, nargs='+', default=list(LEARNING_RATES))
  args = parser.parse_args(argv)
  if min(args.lrs) <= 0:
    parser.error(f'--lrs must be positive; got {args.lrs}.')
  record = study.begin()
  if args.quick:
    args.lrs, args.epochs, args.seeds = [0.1, 10.0], 1, [0]
  data = study.Data.load(*study.QUICK_EXAMPLES if args.quick else (0, 0))
  runs = {model: {} for model in MODELS}
  for model_name, model in MODELS.items():
    for lr in args.lrs:
      runs[model_name][str(lr)] = []
      for seed in args.seeds:
        run = study.train(model, data, learning_rate=lr, epochs=args.epochs, seed=seed)
        print(
          f'{model_name}, lr {lr}, seed {seed}: {outcome(run)}, {run["epochs"][-1]}', flush=True
        )
        runs[model_name][str(lr)].append(run)
  note = (
    f'SGD, batch 256, {args.epochs} epoch(s), seeds {args.seeds}; cells: the test accuracy after '
    'the first and the last epoch (median over the seeds that did not diverge), and after the '
    "last, how many seeds stalled (last epoch's training loss > "
    f'{STALLED_LOSS}), were unstable (> {UNSTABLE_LOSS}) or diverged'
  )
  settings = {k: v for k, v in vars(args).items() if k != 'out'}
  outcomes = {m: {lr: [outcome(r) for r in rs] for lr, rs in v.items()} for m, v in runs.items()}
  text = study.save(
    args.out,
    {'settings': settings, 'outcomes': outcomes, 'runs': runs},
    table(runs, args.lrs, args.epochs),
    note,
    record,
  )
  plot(runs, args.lrs, args.out)
  print(text)


if __name__ == '__main__':
  main()
