"""Smoke test of an installed jaxbn (`make package` runs it in a venv holding the wheel alone).

  cd /tmp && VENV/bin/python /path/to/tools/smoke.py [--any-location]

Run from outside the repository, so that `import jaxbn` finds the installed package and
not the working tree (it says where it found it, and fails if that is not site-packages,
unless `--any-location`: an editable install, say).

1. Imports every module of jaxbn (`pkgutil.walk_packages`).
2. Fails if that imported any of the application's requirements (`APPLICATION`), unless
   Flax imports that module by itself (optax 0.2.6 imports chex, say): then it is Flax's
   requirement, not jaxbn's, and it is only reported.
3. Trains a tiny linen model with `jaxbn.BatchNorm` and a tiny NNX model with
   `jaxbn.nnx.BatchNorm` for a few steps of hand-written SGD (`jax.grad`, no optax), and
   fails unless the loss falls and the running averages moved.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import subprocess
import sys

import jax
import jax.numpy as jnp

import jaxbn

# What the chapter's application needs and the library must not import.
APPLICATION = (
  'tensorflow',
  'tensorflow_datasets',
  'orbax',
  'matplotlib',
  'tqdm',
  'ml_collections',
  'torch',
  'chex',
  'd2l_lenet',
)
# Modules of jaxbn that need an optional dependency (an extra), and that dependency.
OPTIONAL = {'jaxbn.equinox': 'equinox'}
STEPS, LEARNING_RATE = 20, 0.1


def import_all() -> list[str]:
  """Imports jaxbn and every module under it; returns their names.

  A module of `OPTIONAL` whose dependency is not installed must say so (a
  ModuleNotFoundError naming that dependency) and is then left out.
  """
  names = ['jaxbn']
  for module in pkgutil.walk_packages(jaxbn.__path__, 'jaxbn.'):
    try:
      importlib.import_module(module.name)
    except ModuleNotFoundError as e:
      if e.name != OPTIONAL.get(module.name):
        raise
      print(f'{module.name} left out: {e}')
      continue
    names.append(module.name)
  return names


def imported_by_flax() -> set[str]:
  """The modules of `APPLICATION` that importing JAX and Flax alone imports (fresh process)."""
  code = (
    'import sys, jax, flax.linen, flax.nnx; '
    f'print(" ".join(m for m in {APPLICATION!r} if m in sys.modules))'
  )
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True)
  return set(out.stdout.split())


def data(n=64, d=8, classes=3):
  """A learnable classification problem: labels from a fixed linear map of the inputs."""
  kx, kw = jax.random.split(jax.random.key(0))
  x = 2.0 + 3.0 * jax.random.normal(kx, (n, d))  # far from zero mean, unit variance
  y = jnp.argmax(x @ jax.random.normal(kw, (d, classes)), axis=-1)
  return x, y


def cross_entropy(logits, labels):
  log_p = jax.nn.log_softmax(logits)
  return -jnp.mean(jnp.take_along_axis(log_p, labels[:, None], axis=-1))


def train_linen():
  """(first loss, last loss, stats before, stats after) of a linen MLP with jaxbn.BatchNorm."""
  import flax.linen as nn

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      x = nn.Dense(16)(x)
      x = jaxbn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
      return nn.Dense(3)(nn.relu(x))

  x, y = data()
  model = MLP()
  variables = model.init(jax.random.key(1), x, train=False)
  params, stats0 = variables['params'], variables['batch_stats']

  @jax.jit
  def step(params, stats):
    def loss_fn(params):
      logits, updates = model.apply(
        {'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats']
      )
      return cross_entropy(logits, y), updates['batch_stats']

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    params = jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads)
    return params, stats, loss

  stats, losses = stats0, []
  for _ in range(STEPS):
    params, stats, loss = step(params, stats)
    losses.append(float(loss))
  logits = model.apply({'params': params, 'batch_stats': stats}, x, train=False)
  assert bool(jnp.isfinite(cross_entropy(logits, y)))
  return losses, stats0['BatchNorm_0'], stats['BatchNorm_0']


def train_nnx():
  """(first loss, last loss, stats before, stats after) of an NNX MLP with jaxbn.nnx.BatchNorm."""
  from flax import nnx

  import jaxbn.nnx

  class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.linear1 = nnx.Linear(8, 16, rngs=rngs)
      self.bn = jaxbn.nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
      self.linear2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
      return self.linear2(nnx.relu(self.bn(self.linear1(x))))

  x, y = data()
  model = MLP(nnx.Rngs(1))
  stats0 = {'mean': model.bn.mean[...], 'var': model.bn.var[...]}

  @nnx.jit
  def step(model):
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - LEARNING_RATE * g, params, grads))
    return loss

  model.train()
  losses = [float(step(model)) for _ in range(STEPS)]
  model.eval()
  assert bool(jnp.isfinite(cross_entropy(model(x), y)))
  return losses, stats0, {'mean': model.bn.mean[...], 'var': model.bn.var[...]}


def check_training(name, losses, before, after) -> str:
  assert all(map(jnp.isfinite, losses)), f'{name}: non-finite loss {losses}'
  assert losses[-1] < 0.8 * losses[0], f'{name}: the loss did not fall: {losses}'
  for key in ('mean', 'var'):
    moved = float(jnp.max(jnp.abs(after[key] - before[key])))
    assert moved > 1e-3, f'{name}: running {key} did not change ({moved})'
  return f'{name}: loss {losses[0]:.3f} -> {losses[-1]:.3f} in {len(losses)} SGD steps'


def main(argv: list[str]) -> int:
  where = jaxbn.__file__
  installed = '--any-location' in argv or 'site-packages' in where
  assert installed, f'jaxbn imported from {where}, not from an installed package'
  names = import_all()
  print(f'jaxbn {importlib.metadata.version("jaxbn")} from {where}: {len(names)} modules imported')
  versions = {n: importlib.metadata.version(n) for n in ('jax', 'jaxlib', 'flax', 'numpy')}
  python = sys.version.split()[0]
  print('with', ', '.join(f'{n} {v}' for n, v in versions.items()), f'Python {python}')

  found = {m for m in APPLICATION if m in sys.modules}
  flax_own = found & imported_by_flax() if found else set()
  if flax_own:
    print(f'imported by Flax itself, not by jaxbn: {", ".join(sorted(flax_own))}')
  assert not found - flax_own, f'importing jaxbn imported {sorted(found - flax_own)}'

  print(check_training('linen', *train_linen()))
  print(check_training('nnx', *train_nnx()))
  print('smoke test passed')
  return 0


if __name__ == '__main__':
  sys.exit(main(sys.argv[1:]))
