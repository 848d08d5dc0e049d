r"""D2L's exercises for the chapter, measured: BN in some layers, gamma and beta fixed, dropout.

  python experiments/exercises.py            # into results/why/exercises
  python experiments/exercises.py --quick    # a tiny run (the test suite's)

The chapter's LeNet and settings (SGD at lr 1.0, batch 256, 10 epochs), with
its BN layers changed (`d2l_lenet.variants`):

* "Do we need batch normalization in every layer?": BN after both
  convolutions only, after both hidden dense layers only, everywhere (the
  chapter), nowhere;
* "Fix the parameters beta and gamma": BN everywhere with gamma = 1, beta = 0;
* "Can you replace dropout by batch normalization?": dropout 0.5 after the
  hidden dense layers' sigmoids (D2L's place for it) without BN, and with BN.

For each, over the seeds: the test accuracy, the training accuracy measured as
the test accuracy is (inference mode, on 10,000 training examples), and their
difference, the train-test gap a regulariser should narrow. Writes
results.json (every epoch of every run, with the commit and CPU), table.md and
exercises.png (test accuracy by epoch) into --out.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2l_lenet import models, study, variants  # noqa: E402

VARIANTS = {
  'BN everywhere (the chapter)': models.LeNet(),
  'BN after the convolutions only': models.LeNet(norm=variants.bn_at(('bn1', 'bn2'))),
  'BN after the dense layers only': models.LeNet(norm=variants.bn_at(('bn3', 'bn4'))),
  'no BN': models.LeNet(norm=None),
  'BN, gamma = 1 and beta = 0 fixed': models.LeNet(norm=variants.fixed_affine_bn()),
  'dropout 0.5, no BN': models.LeNet(norm=None, dropout_rate=0.5),
  'dropout 0.5 and BN': models.LeNet(dropout_rate=0.5),
}

QUICK = ('dropout 0.5 and BN',)


def table(runs: dict) -> list[str]:
  lines = [
    '| LeNet with | test acc | train acc | train - test | test acc range over seeds |',
    '|---|---|---|---|---|',
  ]
  for name, seeds in runs.items():
    last = [r['epochs'][-1] for r in seeds]
    test = [e['test_accuracy'] for e in last]
    train = [e['train_accuracy_eval'] for e in last]
    gap = [a - b for a, b in zip(train, test, strict=True)]
    lines.append(
      f'| {name} | {study.median(test):.3f} | {study.median(train):.3f} | '
      f'{study.median(gap):+.3f} | {min(test):.3f}-{max(test):.3f} |'
    )
  return lines


def plot(runs: dict, out: pathlib.Path) -> None:
  fig, axes = study.figure(1, 2, size=(4.4, 3.2))
  for k, (name, seeds) in enumerate(runs.items()):
    epochs = [e['epoch'] for e in seeds[0]['epochs']]
    for ax, key in zip(axes[0], ('test_accuracy', 'gap'), strict=True):
      values = [
        study.median(
          r['epochs'][i]['train_accuracy_eval'] - r['epochs'][i]['test_accuracy']
          if key == 'gap'
          else r['epochs'][i][key]
          for r in seeds
        )
        for i in range(len(epochs))
      ]
      ax.plot(epochs, values, marker='.', color=f'C{k}', label=name)
  axes[0, 0].set_ylabel('test accuracy (median over seeds)')
  axes[0, 1].set_ylabel('train - test accuracy')
  for ax in axes[0]:
    ax.set_xlabel('epoch')
    ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=6)
  study.save_figure(fig, out / 'exercises.png')


def main(argv=None):
  parser = study.arguments(
    __doc__, 'exercises', epochs=10, seeds=[0, 1], quick=f'{" and ".join(QUICK)}, 1 epoch, seed 0'
  )
  parser.add_argument('--learning-rate', type=float, default=1.0)
  parser.add_argument(
    '--variants',
    nargs='+',
    choices=list(VARIANTS),
    default=list(VARIANTS),
    metavar='NAME',
    help='which of the variants above to train (default: all)',
  )
  args = parser.parse_args(argv)
  record = study.begin()
  if args.quick:
    args.epochs, args.seeds, args.variants = 1, [0], list(QUICK)
  data = study.Data.load(*study.QUICK_EXAMPLES if args.quick else (0, 0))
  runs = {}
  for name in args.variants:
    model = VARIANTS[name]
    runs[name] = []
    for seed in args.seeds:
      run = study.train(
        model, data, learning_rate=args.learning_rate, epochs=args.epochs, seed=seed
      )
      print(f'{name}, seed {seed}: {run["epochs"][-1]}', flush=True)
      runs[name].append(run)
  note = (
    f'SGD at lr {args.learning_rate}, batch 256, {args.epochs} epoch(s), seeds {args.seeds}; '
    'cells: medians over the seeds after the last epoch, both accuracies in inference mode '
    '(running averages; train acc on the first 10,000 training examples)'
  )
  settings = {k: v for k, v in vars(args).items() if k != 'out'}
  text = study.save(args.out, {'settings': settings, 'runs': runs}, table(runs), note, record)
  plot(runs, args.out)
  print(text)


if __name__ == '__main__':
  main()
