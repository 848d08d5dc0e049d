"""An in-process trainer for the experiments that look inside training (docs/why.md).

`train` runs SGD on a linen model as `d2l_lenet.steps` does (the data on the
device, a permutation per epoch, full batches of ``batch_size``, the mean
cross-entropy, BN in training mode with its running averages updated), with
two differences that the experiments need: the learning rate is an argument
of one compiled step (``optax.inject_hyperparams``), so a sweep compiles once
per model; and every ``probe_every`` steps a *probe* sees the loss of the
next batch as a function of the parameters alone (`d2l_lenet.measures`).

The model is called as ``model.apply(variables, images, train=...)`` with the
rng streams ``'dropout'`` and ``'noise'`` in training mode.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import pathlib
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2l_lenet import data as data_lib
from d2l_lenet import files, provenance

Probe = Callable[[Callable[[Any], jax.Array], Any, jax.Array], dict[str, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Data:
  """Fashion-MNIST on the device: images (N, 28, 28, 1) float32 in [0, 1], labels (N,) int32."""

  train_images: jax.Array
  train_labels: jax.Array
  test_images: jax.Array
  test_labels: jax.Array

  @classmethod
  def load(cls, num_train: int = 0, num_test: int = 0) -> Data:
    """All of Fashion-MNIST, or its first ``num_train``/``num_test`` examples (0: all)."""
    ds = data_lib.load_fashion_mnist().subset(num_train, num_test)
    put = jax.device_put
    return cls(put(ds.train_images), put(ds.train_labels), put(ds.test_images), put(ds.test_labels))


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def train_loss_fn(model: nn.Module, batch_stats: Any, images, labels, rng) -> Callable:
  """The training-mode loss of one batch as a function of the parameters alone.

  Returns ``loss_fn(params) -> (loss, (new_batch_stats, logits))``; the batch
  statistics of BN come from ``images`` and the noise from ``rng``.
  """
  dropout, noise = jax.random.split(rng)

  def loss_fn(params):
    logits, updates = model.apply(
      {'params': params, 'batch_stats': batch_stats},
      images,
      train=True,
      mutable=['batch_stats'],
      rngs={'dropout': dropout, 'noise': noise},
    )
    return _cross_entropy(logits, labels), (updates.get('batch_stats', {}), logits)

  return loss_fn


@functools.partial(jax.jit, static_argnums=(0, 1))
def _chunk(model, probe, state, lr, images, labels, indices, rngs):
  """``len(indices)`` SGD steps (a scan), then the probe on the batch after them."""
  params, batch_stats, opt_state = state
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
  opt_state = opt_state._replace(hyperparams={'learning_rate': lr})

  def step(carry, xs):
    params, batch_stats, opt_state = carry
    idx, rng = xs
    loss_fn = train_loss_fn(model, batch_stats, images[idx], labels[idx], rng)
    (loss, (batch_stats, logits)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels[idx])
    return (params, batch_stats, opt_state), (loss, accuracy)

  rngs = jax.random.wrap_key_data(rngs)
  (params, batch_stats, opt_state), (losses, accuracies) = jax.lax.scan(
    step, (params, batch_stats, opt_state), (indices[:-1], rngs[:-1])
  )
  probed = {}
  if probe is not None:
    loss_fn = train_loss_fn(model, batch_stats, images[indices[-1]], labels[indices[-1]], rngs[-1])
    probed = probe(lambda p: loss_fn(p)[0], params, lr)
  return (params, batch_stats, opt_state), losses, accuracies, probed


@functools.partial(jax.jit, static_argnums=0)
def _accuracy(model, params, batch_stats, images, labels):
  """Inference-mode (running averages) accuracy and mean loss, in batches of 1000.

  Of the first multiple of 1000 examples (all of them when there are fewer).
  """
  n = images.shape[0] // 1000 * 1000 or images.shape[0]
  size = min(1000, n)

  def batch(i):
    x = jax.lax.dynamic_slice_in_dim(images, i * size, size)
    y = jax.lax.dynamic_slice_in_dim(labels, i * size, size)
    logits = model.apply({'params': params, 'batch_stats': batch_stats}, x, train=False)
    return jnp.mean(jnp.argmax(logits, -1) == y), _cross_entropy(logits, y)

  accuracy, loss = jax.lax.map(batch, jnp.arange(n // size))
  return accuracy.mean(), loss.mean()


def init(model: nn.Module, seed: int, learning_rate: float):
  """(params, batch_stats, opt_state) of ``model`` on one (1, 28, 28, 1) image."""
  variables = jax.jit(functools.partial(model.init, train=False))(
    jax.random.key(seed), jnp.zeros((1, 28, 28, 1), jnp.float32)
  )
  tx = optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
  params = variables['params']
  return params, variables.get('batch_stats', {}), tx.init(params)


def train(
  model: nn.Module,
  data: Data,
  *,
  learning_rate: float,
  epochs: int,
  seed: int = 0,
  batch_size: int = 256,
  probe: Probe | None = None,
  probe_every: int = 0,
  train_eval_examples: int = 10000,
) -> dict[str, Any]:
  """Trains ``model`` by SGD; stops early when the loss is not finite.

  Args:
    probe: called as ``probe(loss_fn, params, learning_rate)`` every
      ``probe_every`` steps (and after the last step of each epoch when it
      does not divide the epoch), jitted; returns a dict of arrays.

  Returns:
    ``epochs``: per epoch, the mean training loss and accuracy of its steps
    (training mode), ``train_accuracy_eval`` on the first
    ``train_eval_examples`` training examples and ``test_accuracy`` and
    ``test_loss``, both with the running averages; ``probes``: ``step`` and
    the probe's values (as lists); ``diverged``: whether a loss was not
    finite (the run stops there).
  """
  state = init(model, seed, learning_rate)
  lr = jnp.float32(learning_rate)
  n = data.train_images.shape[0]
  steps_per_epoch = n // batch_size
  chunk = probe_every if probe and probe_every else steps_per_epoch
  records, probes, step, diverged = [], [], 0, False
  train_eval = slice(0, min(train_eval_examples, n))
  for epoch in range(epochs):
    order_key, step_key = jax.random.split(jax.random.fold_in(jax.random.key(seed), epoch))
    order = jax.random.permutation(order_key, n)[: steps_per_epoch * batch_size]
    order = order.reshape(steps_per_epoch, batch_size)
    # Raw key data: each step's key (and the probe's, the last) is sliced from it per chunk.
    rngs = jax.random.key_data(jax.random.split(step_key, steps_per_epoch + 1))
    losses, accuracies = [], []
    for start in range(0, steps_per_epoch, chunk):
      stop = min(start + chunk, steps_per_epoch)
      # The probe's batch is the next one; at an epoch's end, the epoch's first batch.
      nxt = order[stop] if stop < steps_per_epoch else order[0]
      idx = jnp.concatenate([order[start:stop], nxt[None]])
      state, chunk_losses, chunk_acc, probed = _chunk(
        model, probe, state, lr, data.train_images, data.train_labels, idx, rngs[start : stop + 1]
      )
      step += stop - start
      losses.append(np.asarray(chunk_losses))
      accuracies.append(np.asarray(chunk_acc))
      if probed:
        probes.append({'step': step, **jax.tree.map(lambda v: np.asarray(v).tolist(), probed)})
      if not np.all(np.isfinite(losses[-1])):
        diverged = True
        break
    params, batch_stats, _ = state
    test_acc, test_loss = _accuracy(model, params, batch_stats, data.test_images, data.test_labels)
    train_acc, _ = _accuracy(
      model, params, batch_stats, data.train_images[train_eval], data.train_labels[train_eval]
    )
    losses = np.concatenate(losses)
    records.append(
      {
        'epoch': epoch + 1,
        'step': step,
        'train_loss': float(np.mean(losses)),
        'train_accuracy': float(np.mean(np.concatenate(accuracies))),
        'train_accuracy_eval': float(train_acc),
        'test_accuracy': float(test_acc),
        'test_loss': float(test_loss),
      }
    )
    if diverged:
      break
  return {'epochs': records, 'probes': probes, 'diverged': diverged}


QUICK_EXAMPLES = (2048, 1000)  # training and test examples of an experiment's --quick run
ROOT = pathlib.Path(__file__).resolve().parents[1]


def positive_int(text: str) -> int:
  """An argparse type: an integer of at least 1."""
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be at least 1, not {value}')
  return value


def arguments(
  doc: str, name: str, *, epochs: int, seeds: list[int], quick: str
) -> argparse.ArgumentParser:
  """The options of every experiment: --epochs, --seeds, --quick (which runs ``quick``
  describes, on `QUICK_EXAMPLES`) and --out (default results/why/``name``)."""
  parser = argparse.ArgumentParser(
    description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('--epochs', type=positive_int, default=epochs)
  parser.add_argument('--seeds', type=int, nargs='+', default=seeds)
  parser.add_argument(
    '--quick',
    action='store_true',
    help=f'{quick}, on {QUICK_EXAMPLES[0]} training and {QUICK_EXAMPLES[1]} test examples',
  )
  parser.add_argument('--out', type=pathlib.Path, default=ROOT / 'results/why' / name)
  return parser


def train_each(
  models: dict[str, nn.Module], learning_rates, seeds, data: Data, **options: Any
) -> dict[str, list[dict[str, Any]]]:
  """`train` for each learning rate, model and seed, in that order.

  Returns ``{'<model name>, lr <lr>': [the run of each seed]}``; ``options``
  go to `train` (``epochs``, ``probe``, ...).
  """
  runs = {}
  for lr in learning_rates:
    for name, model in models.items():
      key = f'{name}, lr {lr}'
      runs[key] = []
      for seed in seeds:
        print(f'{key}, seed {seed}', flush=True)
        runs[key].append(train(model, data, learning_rate=lr, seed=seed, **options))
  return runs


def final_cells(seeds: list[dict[str, Any]]) -> str:
  """Two table cells for the seeds of one run: the last epoch's training loss (median) and
  test accuracy (median, and range)."""
  loss = median(r['epochs'][-1]['train_loss'] for r in seeds)
  acc = [r['epochs'][-1]['test_accuracy'] for r in seeds]
  return f'{loss:.3f} | {median(acc):.3f} ({min(acc):.3f}-{max(acc):.3f})'


def _json_safe(value: Any) -> Any:
  """``value`` with NaN and infinities as None (JSON has neither)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: _json_safe(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_json_safe(v) for v in value]
  return value


def begin() -> dict[str, Any]:
  """The provenance of the command starting now (`d2l_lenet.provenance.record`), for `save`.

  Taken at the start, so that the commit named is the code that ran.
  """
  return {**provenance.record(), 'started': time.perf_counter()}


def save(
  out: pathlib.Path, results: dict[str, Any], table: list[str], note: str, record: dict[str, Any]
) -> str:
  """Writes ``out``/results.json (``results`` and the provenance) and ``out``/table.md.

  ``record`` is `begin`'s, to which the wall time is added. The table's first
  line names the commit and CPU, then ``note`` (seeds, epochs, what a cell
  holds). Returns the table's text.
  """
  record = dict(record)
  record['wall_seconds'] = round(time.perf_counter() - record.pop('started'), 1)
  text = '\n'.join(
    [
      f'Measured at commit {(record["commit"] or "unknown")[:12]} on {record["cpu_description"]}; '
      f'{note}.',
      '',
      *table,
    ]
  )
  with files.atomic_file(out / 'results.json', 'w') as f:
    json.dump(_json_safe({'provenance': record, **results}), f, indent=1)
  with files.atomic_file(out / 'table.md', 'w') as f:
    f.write(text + '\n')
  return text


def median(values) -> float:
  """The median of the finite ``values`` (NaN when there are none)."""
  finite = [v for v in values if v is not None and math.isfinite(v)]
  return float(np.median(finite)) if finite else math.nan


def figure(nrows: int, ncols: int, size=(3.2, 2.6)):
  """A matplotlib figure (Agg) and its axes, to be written by ``save_figure``."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(
    nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), dpi=110, squeeze=False
  )
  return fig, axes


def save_figure(fig, path: pathlib.Path) -> None:
  """Writes ``fig`` to ``path`` (PNG) atomically and closes it."""
  fig.tight_layout()
  with files.atomic_file(path, 'wb') as f:
    fig.savefig(f, format='png')
  import matplotlib.pyplot as plt

  plt.close(fig)
