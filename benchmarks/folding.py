r"""Inference speed of LeNet-BN vs the same model with BN folded by `jaxbn.folding.fold`.

  python benchmarks/folding.py [--batch 2000] [--repeats 7] [--norm jaxbn] [--conv-impl auto]

Both jitted, with the variables as arguments (not constants XLA could fold),
same inputs, timed interleaved in one process; prints the median examples/s
of each, their ratio and the largest difference of their logits. The running
statistics come from a few training-mode calls, so folding is not the identity.
"""

import argparse
import functools
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from jaxbn import folding

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # d2l_lenet, in the checkout

from d2l_lenet.models import CONV_IMPLS, LeNet, norm_layer


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument('--batch', type=int, default=2000)
  parser.add_argument('--repeats', type=int, default=7)
  parser.add_argument('--norm', choices=('jaxbn', 'flax'), default='jaxbn')
  parser.add_argument('--conv-impl', choices=CONV_IMPLS, default='auto')
  args = parser.parse_args()
  images = jax.random.uniform(jax.random.key(0), (args.batch, 28, 28, 1))
  model = LeNet(norm=norm_layer(args.norm, momentum=0.9), conv_impl=args.conv_impl)
  variables = model.init(jax.random.key(1), images[:2], train=False)
  for _ in range(3):
    _, stats = model.apply(variables, images[:256], train=True, mutable=['batch_stats'])
    variables = {**variables, **stats}
  apply_fn, params = folding.fold(model, variables, images, train=False)
  bn = jax.jit(functools.partial(model.apply, train=False))
  folded = jax.jit(functools.partial(apply_fn, train=False))
  runs = {
    'LeNet-BN (inference mode)': lambda: bn(variables, images),
    'LeNet, BN folded': lambda: folded(params, images),
  }
  times = {name: [] for name in runs}
  for f in runs.values():
    jax.block_until_ready(f())
  for _ in range(args.repeats):
    for name, f in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(f())
      times[name].append(time.perf_counter() - start)
  base = statistics.median(times['LeNet-BN (inference mode)'])
  print(
    f'device {jax.devices()[0]}, norm {args.norm}, conv_impl {args.conv_impl}, '
    f'batch {args.batch}, median of {args.repeats}'
  )
  for name, t in times.items():
    median = statistics.median(t)
    print(f'{name:28s} {args.batch / median:>10,.0f} examples/s   x{base / median:.2f}')
  diff = jnp.abs(runs['LeNet, BN folded']() - runs['LeNet-BN (inference mode)']()).max()
  print(f'max |logit difference| {float(diff):.2e}')


if __name__ == '__main__':
  main()
