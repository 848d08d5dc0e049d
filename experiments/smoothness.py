r"""Smoothness of the loss along the gradient, as Santurkar et al.'s Figure 4, with and without BN.

  python experiments/smoothness.py            # into results/why/smoothness
  python experiments/smoothness.py --quick    # a tiny run (the test suite's)

LeNet with and without BN trains by SGD at lr 1.0 and 0.1. Every
--probe-every steps, on the next batch (in training mode, so BN uses that
batch's statistics), `d2l_lenet.measures.gradient_landscape` walks from the
weights w along the gradient g to w - eta * g for eta = lr times each of
--factors and records:

* the loss range: max minus min of the loss over those points and w itself
  (their "variation of the loss", Fig. 4a);
* the gradient predictiveness: the largest l2 change of the gradient,
  ||g(w - eta g) - g(w)|| (Fig. 4b);
* the effective beta-smoothness: the largest such change per unit distance
  moved, ||g(w - eta g) - g(w)|| / ||eta g|| (Fig. 4c).

Smaller is smoother: the step that SGD takes lands where the gradient said it
would. Writes results.json (every probe of every seed, with the commit and
CPU), table.md and smoothness.png into --out.
"""

import functools
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax.numpy as jnp  # noqa: E402

from d2l_lenet import measures, models, study  # noqa: E402

MODELS = {'BN': models.LeNet(), 'no BN': models.LeNet(norm=None)}
LEARNING_RATES = (1.0, 0.1)
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MEASURES = {
  'loss_range': 'loss range',
  'gradient_predictiveness': 'gradient predictiveness',
  'beta_smoothness': 'effective beta-smoothness',
}


def landscape_probe(loss_fn, params, learning_rate, factors):
  """`measures.gradient_landscape` at step sizes ``learning_rate * factors``."""
  return measures.gradient_landscape(loss_fn, params, learning_rate * jnp.asarray(factors))


def table(runs: dict, steps_per_epoch: int) -> list[str]:
  lines = [
    '| run | ' + ' | '.join(MEASURES.values()) + ' | training loss | test acc (seeds) |',
    '|---' * (len(MEASURES) + 3) + '|',
  ]
  for name, seeds in runs.items():
    probes = [p for r in seeds for p in r['probes']]
    last_step = max(p['step'] for p in probes)
    last = [p for p in probes if p['step'] > last_step - steps_per_epoch]
    cells = [
      f'{study.median(p[key] for p in probes):.3g} / {study.median(p[key] for p in last):.3g}'
      for key in MEASURES
    ]
    lines.append(f'| {name} | {" | ".join(cells)} | {study.final_cells(seeds)} |')
  return lines


def plot(runs: dict, out: pathlib.Path) -> None:
  fig, axes = study.figure(1, 3)
  for name, seeds in runs.items():
    model, lr = name.split(', lr ')
    color = 'C0' if model == 'BN' else 'C3'
    style = '-' if float(lr) == 1.0 else '--'
    steps = [p['step'] for p in seeds[0]['probes']]
    for ax, key in zip(axes[0], MEASURES, strict=True):
      per_step = [
        [r['probes'][k][key] for r in seeds if k < len(r['probes'])] for k in range(len(steps))
      ]
      ax.plot(steps, [study.median(v) for v in per_step], style, color=color, lw=1.2, label=name)
      ax.fill_between(
        steps, [min(v) for v in per_step], [max(v) for v in per_step], color=color, alpha=0.15, lw=0
      )
  for ax, title in zip(axes[0], MEASURES.values(), strict=True):
    ax.set_title(title, fontsize=9)
    ax.set_yscale('log')
    ax.set_xlabel('step')
    ax.grid(True, alpha=0.3)
  axes[0, 0].legend(fontsize=7)
  study.save_figure(fig, out / 'smoothness.png')


def main(argv=None):
  parser = study.arguments(
    __doc__, 'smoothness', epochs=3, seeds=[0, 1, 2], quick='BN at lr 1.0, 1 epoch, seed 0'
  )
  parser.add_argument(
    '--probe-every', type=study.positive_int, default=47, help='steps between probes'
  )
  parser.add_argument(
    '--factors', type=float, nargs='+', default=list(FACTORS), help='step sizes, in units of lr'
  )
  args = parser.parse_args(argv)
  if min(args.factors) <= 0:
    parser.error(f'--factors must be positive step sizes; got {args.factors}.')
  record = study.begin()
  if args.quick:
    args.epochs, args.seeds, args.probe_every = 1, [0], 4
  data = study.Data.load(*study.QUICK_EXAMPLES if args.quick else (0, 0))
  probe = functools.partial(landscape_probe, factors=tuple(args.factors))
  lrs = LEARNING_RATES[:1] if args.quick else LEARNING_RATES
  models = {'BN': MODELS['BN']} if args.quick else MODELS
  runs = study.train_each(
    models, lrs, args.seeds, data, epochs=args.epochs, probe=probe, probe_every=args.probe_every
  )
  note = (
    f'LeNet, SGD, batch 256, {args.epochs} epoch(s), seeds {args.seeds}, a probe every '
    f'{args.probe_every} steps at step sizes {args.factors} x lr; cells: the median over the '
    'probes of all seeds, over all of training / over the last epoch; the training loss of the '
    'last epoch (median) and the final test accuracy (median, range over seeds)'
  )
  settings = {k: v for k, v in vars(args).items() if k != 'out'}
  text = study.save(
    args.out,
    {'settings': settings, 'runs': runs},
    table(runs, data.train_images.shape[0] // 256),
    note,
    record,
  )
  plot(runs, args.out)
  print(text)


if __name__ == '__main__':
  main()
