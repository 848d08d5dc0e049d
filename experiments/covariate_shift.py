r"""Internal covariate shift, measured as Santurkar et al. (2018) define it, with and without BN.

  python experiments/covariate_shift.py            # into results/why/covariate_shift
  python experiments/covariate_shift.py --quick    # a tiny run (the test suite's)

LeNet (the chapter's, `d2l_lenet.models.LeNet`) trains by SGD at lr 1.0 and
0.1 with BN, without BN, and with "noisy BN" (`d2l_lenet.variants.
NoisyBatchNorm`: BN followed by a random per-channel scale in [1, 2] and shift
in [-1, 1], drawn anew at each step). Every --probe-every steps, on the next
batch, `d2l_lenet.measures.covariate_shift` compares each layer's gradient
before and after the layers below it take that batch's SGD step (Definition
2.1): the l2 difference and the cosine. Layer i is a convolution or dense
layer together with the BN layer after it.

If BN worked by reducing internal covariate shift, the BN network's l2
differences would be smaller and its cosines nearer 1, and noisy BN (more
shift, put back after BN) would train worse than BN.

Writes results.json (every probe and epoch of every seed, with the commit and
CPU), table.md and covariate_shift.png into --out.
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402

from d2l_lenet import measures, models, study, variants  # noqa: E402

MODELS = {
  'BN': models.LeNet(),
  'no BN': models.LeNet(norm=None),
  'noisy BN': models.LeNet(norm=variants.noisy_bn()),
}
LEARNING_RATES = (1.0, 0.1)
QUICK = ('no BN', 'noisy BN')  # the models of --quick: one compilation each
LAYER_NAMES = tuple(group[0] for group in variants.LENET_LAYERS)  # conv1 ... fc3


def shift_probe(loss_fn, params, learning_rate):
  """`measures.covariate_shift` for the SGD step that ``loss_fn``'s batch gives."""
  grads = jax.grad(loss_fn)(params)
  new_params = jax.tree.map(lambda w, g: w - learning_rate * g, params, grads)
  return measures.covariate_shift(loss_fn, params, new_params, variants.present(params))


def table(runs: dict) -> list[str]:
  lines = [
    "| run | \\|G - G'\\|, layers 2-5 | that / \\|G\\| | cos(G, G') | training loss | test acc |",
    '|---|---|---|---|---|---|',
  ]
  for name, seeds in runs.items():
    probes = [p for r in seeds for p in r['probes']]
    cells = [
      ' / '.join(f'{study.median(p[key][i] for p in probes):.3f}' for i in range(1, 5))
      for key in ('l2', 'relative_l2', 'cosine')
    ]
    lines.append(f'| {name} | {" | ".join(cells)} | {study.final_cells(seeds)} |')
  return lines


def plot(runs: dict, out: pathlib.Path) -> None:
  fig, axes = study.figure(3, 4)
  styles = {'BN': '-', 'no BN': '--', 'noisy BN': ':'}
  for name, seeds in runs.items():
    model, lr = name.split(', lr ')
    color = 'C0' if float(lr) == 1.0 else 'C1'
    steps = [p['step'] for p in seeds[0]['probes']]
    for row, measure in enumerate(('l2', 'cosine')):
      for col in range(4):
        values = [
          study.median(r['probes'][k][measure][col + 1] for r in seeds if k < len(r['probes']))
          for k in range(len(steps))
        ]
        axes[row, col].plot(steps, values, styles[model], color=color, lw=1, label=name)
    epochs = [e['epoch'] for e in seeds[0]['epochs']]
    for col, key in enumerate(('train_loss', 'test_accuracy')):
      values = [
        study.median(r['epochs'][k][key] for r in seeds if k < len(r['epochs']))
        for k in range(len(epochs))
      ]
      axes[2, col].plot(epochs, values, styles[model], color=color, marker='.', label=name)
  for col in range(4):
    axes[0, col].set_title(f'layer {col + 2} ({LAYER_NAMES[col + 1]})', fontsize=9)
    axes[0, col].set_yscale('log')
    axes[1, col].set_xlabel('step')
  axes[0, 0].set_ylabel("||G - G'||")
  axes[1, 0].set_ylabel("cos(G, G')")
  axes[2, 0].set_ylabel('training loss')
  axes[2, 1].set_ylabel('test accuracy')
  for ax in axes[2, :2]:
    ax.set_xlabel('epoch')
  axes[2, 1].legend(fontsize=7)
  for ax in axes[2, 2:]:
    ax.axis('off')
  for ax in axes.flat:
    ax.grid(True, alpha=0.3)
  study.save_figure(fig, out / 'covariate_shift.png')


def main(argv=None):
  parser = study.arguments(
    __doc__,
    'covariate_shift',
    epochs=3,
    seeds=[0, 1, 2],
    quick='no BN and noisy BN at lr 1.0, 1 epoch, seed 0',
  )
  parser.add_argument(
    '--probe-every', type=study.positive_int, default=47, help='steps between probes'
  )
  args = parser.parse_args(argv)
  record = study.begin()
  if args.quick:
    args.epochs, args.seeds, args.probe_every = 1, [0], 4
  data = study.Data.load(*study.QUICK_EXAMPLES if args.quick else (0, 0))
  lrs = LEARNING_RATES[:1] if args.quick else LEARNING_RATES
  models = {k: MODELS[k] for k in QUICK} if args.quick else MODELS
  runs = study.train_each(
    models,
    lrs,
    args.seeds,
    data,
    epochs=args.epochs,
    probe=shift_probe,
    probe_every=args.probe_every,
  )
  note = (
    f'LeNet, SGD, batch 256, {args.epochs} epoch(s), seeds {args.seeds}, a probe every '
    f'{args.probe_every} steps; cells: the median over probes and seeds for layers 2 to 5 '
    '(layer 1 has nothing below it); the training loss of the last epoch (training mode, with the '
    'noise; median over seeds) and the final test accuracy (median, range over seeds)'
  )
  settings = {k: v for k, v in vars(args).items() if k != 'out'}
  text = study.save(
    args.out,
    {'settings': settings, 'layers': LAYER_NAMES, 'runs': runs},
    table(runs),
    note,
    record,
  )
  plot(runs, args.out)
  print(text)


if __name__ == '__main__':
  main()
