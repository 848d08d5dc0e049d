r"""Inference speed of LeNet-BN vs the same model with BN folded into its layers.

  python benchmarks/folding.py [--batch 2000] [--repeats 7]

Both compiled, same inputs, timed interleaved in one process; prints the median
examples/s of each and their ratio. Outputs agree to float32 tolerance
(tests/test_folding.py).
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from jaxbn import folding
from jaxbn.models import LeNet


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawTextHelpFormatter
  )
  parser.add_argument('--batch', type=int, default=2000)
  parser.add_argument('--repeats', type=int, default=7)
  args = parser.parse_args()
  images = jax.random.uniform(jax.random.key(0), (args.batch, 28, 28, 1))
  model = LeNet()
  variables = model.init(jax.random.key(1), images[:2], train=False)
  folded = folding.fold_batch_norms(variables['params'], variables['batch_stats'])
  runs = {
    'LeNet-BN (inference mode)': jax.jit(lambda x: model.apply(variables, x, train=False)),
    'LeNet, BN folded': jax.jit(
      lambda x: LeNet(norm=None).apply({'params': folded}, x, train=False)
    ),
  }
  times = {name: [] for name in runs}
  for f in runs.values():
    jax.block_until_ready(f(images))
  for _ in range(args.repeats):
    for name, f in runs.items():
      start = time.perf_counter()
      jax.block_until_ready(f(images))
      times[name].append(time.perf_counter() - start)
  base = statistics.median(times['LeNet-BN (inference mode)'])
  print(f'device {jax.devices()[0]}, batch {args.batch}, median of {args.repeats}')
  for name, t in times.items():
    median = statistics.median(t)
    print(f'{name:28s} {args.batch / median:>10,.0f} examples/s   x{base / median:.2f}')
  diff = jnp.abs(runs['LeNet, BN folded'](images) - runs['LeNet-BN (inference mode)'](images)).max()
  print(f'max |logit difference| {float(diff):.2e}')


if __name__ == '__main__':
  main()
