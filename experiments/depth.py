r"""Depth: do BN, residual connections, or both let plain SGD train 100+ layer nets? (issue #25)

  python experiments/depth.py              # the full study, into results/why/depth
  python experiments/depth.py --quick      # a smoke test, well under a minute
  python experiments/depth.py --depths 8 32 --lrs 0.1 --epochs 1

The chapter says BN together with residual connections lets researchers train
networks of more than 100 layers. This measures the two apart and together:
`d2l_lenet.deep.DeepMLP` (flatten, Dense(width), ``depth`` blocks, head; every
Dense He-normal) in four variants,

* plain:       x = relu(Dense(x))
* bn:          x = relu(BN(Dense(x)))
* residual:    x = x + Dense(relu(x))          (pre-activation, He et al. 2016)
* residual+bn: x = x + Dense(relu(BN(x)))

at each of --depths, trained on Fashion-MNIST with plain SGD (batch 256,
--epochs epochs) at each of --lrs and --seeds, in this process
(`d2l_lenet.study.train`: one compilation per depth and variant serves every
learning rate). A run stops when its loss becomes non-finite (diverged).
After each epoch the test set is evaluated with the running averages. A cell
of the table is, for one depth and variant, the median over seeds of the
final test accuracy (a diverged run counts 0) at the learning rate where that
median is highest; every run is kept in results.json. For each depth and
variant the activation std and the gradient norm of each block's kernel at
initialisation (seed 0, training mode, the first 256 training images) are
recorded too (`d2l_lenet.deep.init_scales`).

Writes into --out: results.json (the commit and CPU, settings, every
run's per-epoch records, the summary, the scales), table.md (variants by
depths) and depth.png (test accuracy against depth; the scales of the deepest
nets per block).
"""

import argparse
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from d2l_lenet import deep, study  # noqa: E402

VARIANTS = {
  'plain': {'norm': False, 'residual': False},
  'bn': {'norm': True, 'residual': False},
  'residual': {'norm': False, 'residual': True},
  'residual+bn': {'norm': True, 'residual': True},
}
DEFAULTS = {
  'depths': [2, 8, 32, 128],
  'seeds': [0, 1],
  'lrs': [0.01, 0.1, 1.0],
  'epochs': 2,
  'num_train': 0,
  'num_test': 0,
}
QUICK = {
  'depths': [2],
  'seeds': [0],
  'lrs': [0.1],
  'epochs': 1,
  'num_train': 2048,
  'num_test': 1024,
}
CHANCE = 0.2  # a best accuracy below this reads 'chance' (10 classes: 0.1 by guessing)
SCALES_BATCH = 256


def summarize(runs: list[dict], lrs: list[float], seeds: list[int]) -> dict:
  """Per lr, the seeds' final test accuracies and their median (diverged counts 0); the best lr."""
  per_lr = {}
  for lr in lrs:
    ours = [r for r in runs if r['lr'] == lr]
    accs = [None if r['diverged'] else r['epochs'][-1]['test_accuracy'] for r in ours]
    per_lr[str(lr)] = {
      'test_accuracy_per_seed': accs,
      'diverged': sum(r['diverged'] for r in ours),
      'median': statistics.median(0.0 if a is None else a for a in accs),
    }
  best = max(lrs, key=lambda lr: per_lr[str(lr)]['median'])  # the first of ties
  return {
    'best_lr': best,
    'test_accuracy': per_lr[str(best)]['median'],
    'diverged_at_best_lr': per_lr[str(best)]['diverged'],
    'seeds': len(seeds),
    'per_lr': per_lr,
  }


def cell(s: dict) -> str:
  """A table cell: the median at the best lr, with divergence and chance made plain."""
  if s['diverged_at_best_lr'] * 2 > s['seeds']:
    return 'diverged at every lr'
  note = f', {s["diverged_at_best_lr"]}/{s["seeds"]} diverged' if s['diverged_at_best_lr'] else ''
  acc = s['test_accuracy']
  if acc < CHANCE:
    return f'chance ({acc:.2f}, lr {s["best_lr"]:g}{note})'
  return f'{acc:.3f} (lr {s["best_lr"]:g}{note})'


def table(settings: dict, summary: dict) -> list[str]:
  depths = settings['depths']
  rows = [
    '| variant | ' + ' | '.join(f'depth {d}' for d in depths) + ' |',
    '|---' * (len(depths) + 1) + '|',
  ]
  for variant in settings['variants']:
    cells = [cell(summary[str(d)][variant]) for d in depths]
    rows.append(f'| {variant} | ' + ' | '.join(cells) + ' |')
  return rows


def note(settings: dict) -> str:
  joined = lambda xs: ' '.join(f'{x:g}' for x in xs)
  return (
    f'seeds {joined(settings["seeds"])}, epochs {settings["epochs"]}, lrs '
    f'{joined(settings["lrs"])} (plain SGD), width {settings["width"]}, batch '
    f'{settings["batch_size"]}, {settings["train_examples"]} training and '
    f'{settings["test_examples"]} test examples; cell = median over seeds of the final test '
    'accuracy (a diverged run counts 0) at the learning rate where it is highest (that lr); '
    "'diverged at every lr': the loss became non-finite in most seeds at every lr; 'chance': "
    f'below {CHANCE}'
  )


def figure(results: dict, path: pathlib.Path) -> None:
  settings, summary, scales = results['settings'], results['summary'], results['scales']
  depths = settings['depths']
  fig, axes = study.figure(1, 2, size=(5.0, 3.8))
  left, right = axes[0]
  for i, variant in enumerate(settings['variants']):
    accs = [summary[str(d)][variant]['test_accuracy'] for d in depths]
    left.plot(depths, accs, 'o-', color=f'C{i}', label=variant)
    deepest = scales[str(depths[-1])][variant]
    blocks = np.arange(len(deepest['activation_std']))
    nan = lambda xs: [np.nan if x is None else x for x in xs]
    right.plot(blocks, nan(deepest['activation_std']), '-', color=f'C{i}', label=variant)
    right.plot(blocks, nan(deepest['grad_norm']), '--', color=f'C{i}')
  left.axhline(0.1, color='gray', ls=':', lw=1, label='chance')
  left.set_xscale('log', base=2)
  left.set_xticks(depths, [str(d) for d in depths])
  left.set_xlabel('blocks')
  left.set_ylabel('test accuracy (median over seeds, best lr)')
  left.set_ylim(0, 1)
  epochs = settings['epochs']
  left.set_title(f'After {epochs} epoch{"s" * (epochs != 1)} of SGD (diverged: 0)', fontsize=9)
  right.set_yscale('log')
  right.xaxis.get_major_locator().set_params(integer=True)
  right.set_xlabel('block')
  right.set_ylabel('at initialisation')
  right.set_title(
    f'{depths[-1]} blocks: activation std (solid), |grad of kernel| (dashed)', fontsize=9
  )
  for ax in (left, right):
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  study.save_figure(fig, path)


def main(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--quick', action='store_true', help=f'smoke-test sizes, {QUICK}; explicit flags still win'
  )
  parser.add_argument('--depths', nargs='+', type=int, help=f'default {DEFAULTS["depths"]}')
  parser.add_argument('--seeds', nargs='+', type=int, help=f'default {DEFAULTS["seeds"]}')
  parser.add_argument('--lrs', nargs='+', type=float, help=f'SGD rates (default {DEFAULTS["lrs"]})')
  parser.add_argument('--epochs', type=int, help=f'default {DEFAULTS["epochs"]}')
  parser.add_argument('--num-train', type=int, help='first N training examples (default 0: all)')
  parser.add_argument('--num-test', type=int, help='first N test examples (default 0: all)')
  parser.add_argument('--width', type=int, default=64, help='units per block (default 64)')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'results/why/depth')
  args = parser.parse_args(argv)
  for name, default in (QUICK if args.quick else DEFAULTS).items():
    if getattr(args, name) is None:
      setattr(args, name, default)

  record = study.begin()
  data = study.Data.load(args.num_train, args.num_test)
  scale_batch = data.train_images[:SCALES_BATCH], data.train_labels[:SCALES_BATCH]
  runs, summary, scales = [], {}, {}
  for depth in args.depths:
    summary[str(depth)], scales[str(depth)] = {}, {}
    for variant, kind in VARIANTS.items():
      model = deep.DeepMLP(depth=depth, width=args.width, **kind)
      params, batch_stats, _ = study.init(model, 0, 0.0)
      s = deep.init_scales(model, {'params': params, 'batch_stats': batch_stats}, *scale_batch)
      # study.save writes an overflowed scale (inf, NaN) as null.
      scales[str(depth)][variant] = {k: v.tolist() for k, v in s.items()}
      ours = []
      for lr in args.lrs:
        for seed in args.seeds:
          run = {'depth': depth, 'variant': variant, 'lr': lr, 'seed': seed}
          run.update(
            study.train(
              model, data, learning_rate=lr, epochs=args.epochs, seed=seed,
              batch_size=args.batch_size,
            )
          )  # fmt: skip
          ours.append(run)
          last = run['epochs'][-1]
          outcome = (
            f'diverged in epoch {last["epoch"]}'
            if run['diverged']
            else f'test acc {last["test_accuracy"]:.3f}, train loss {last["train_loss"]:.3f}'
          )
          print(f'depth {depth:>3} {variant:<11} lr {lr:<5g} seed {seed}: {outcome}', flush=True)
      runs += ours
      summary[str(depth)][variant] = summarize(ours, args.lrs, args.seeds)

  settings = {
    'depths': args.depths,
    'variants': list(VARIANTS),
    'seeds': args.seeds,
    'lrs': args.lrs,
    'epochs': args.epochs,
    'width': args.width,
    'batch_size': args.batch_size,
    'optimizer': 'optax.sgd (no momentum, no weight decay)',
    'bn': {'momentum': deep.MOMENTUM, 'epsilon': deep.EPSILON},
    'train_examples': int(data.train_labels.shape[0]),
    'test_examples': int(data.test_labels.shape[0]),
    'scales': f'seed 0 at initialisation, training mode, the first {SCALES_BATCH} training images',
  }
  results = {'settings': settings, 'summary': summary, 'scales': scales, 'runs': runs}
  text = study.save(args.out, results, table(settings, summary), note(settings), record)
  figure(results, args.out / 'depth.png')
  print(text)


if __name__ == '__main__':
  main()
