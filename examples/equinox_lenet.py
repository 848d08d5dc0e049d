"""The chapter's LeNet with batch norm in Equinox, trained with `jaxbn.equinox.BatchNorm`.

  python examples/equinox_lenet.py                          # Fashion-MNIST, one epoch
  python examples/equinox_lenet.py --epochs 10 --precise    # and precise BN statistics
  python examples/equinox_lenet.py --data synthetic --steps 20
  python examples/equinox_lenet.py --norm equinox           # Equinox's own BatchNorm

`LeNet` has the layers and initialisation of `d2l_lenet.models.LeNet` (linen)
and ``NNXLeNet``: conv1 6@5x5 -> bn1 -> sigmoid -> max-pool 2; conv2 16@5x5 ->
bn2 -> sigmoid -> max-pool 2; fc1 120 -> bn3 -> sigmoid; fc2 84 -> bn4 ->
sigmoid; fc3 10; Xavier-uniform weights and zero biases, BN momentum 0.9 and
epsilon 1e-5 (D2L's); SGD with learning rate 1.0 on batches of 256.

Equinox's convention: the model maps one image (1, 28, 28) (channels first) and
the state to logits (10,) and the new state; ``jax.vmap`` with
``axis_name='batch'`` makes the batch, over which the BN layers take their
statistics. ``--norm equinox`` swaps in ``equinox.nn.BatchNorm(mode='batch')``
and changes nothing else.
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import jaxbn.equinox

AXIS = 'batch'
NORMS = {
  'jaxbn': functools.partial(jaxbn.equinox.BatchNorm, axis_name=AXIS, momentum=0.9, eps=1e-5),
  'equinox': functools.partial(
    eqx.nn.BatchNorm, axis_name=AXIS, momentum=0.9, eps=1e-5, mode='batch'
  ),
}
# Xavier-uniform for Equinox's layouts: (out, in) and (out, in, kh, kw).
_xavier = jax.nn.initializers.xavier_uniform(in_axis=1, out_axis=0)


def _xavier_zero_bias(layer: eqx.Module, key: jax.Array) -> eqx.Module:
  """``layer`` with Xavier-uniform weights and a zero bias, as ``d2l.train_ch6`` initialises."""
  weight = _xavier(key, layer.weight.shape, layer.weight.dtype)
  return eqx.tree_at(lambda m: (m.weight, m.bias), layer, (weight, jnp.zeros_like(layer.bias)))


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """Max over non-overlapping 2x2 windows of a (C, H, W) map with even H, W."""
  c, h, w = x.shape
  return x.reshape(c, h // 2, 2, w // 2, 2).max((2, 4))


class LeNet(eqx.Module):
  """D2L's LeNet with a batch norm after each hidden layer, for one (1, 28, 28) image.

  Args:
    key: the random key of the initialisation.
    norm: the BN layer, called as ``norm(channels)``; by default
      `jaxbn.equinox.BatchNorm` over the vmapped axis ``'batch'`` with D2L's
      momentum and epsilon (`NORMS`).
    num_classes: size of the output layer.
  """

  conv1: eqx.nn.Conv2d
  bn1: Any
  conv2: eqx.nn.Conv2d
  bn2: Any
  fc1: eqx.nn.Linear
  bn3: Any
  fc2: eqx.nn.Linear
  bn4: Any
  fc3: eqx.nn.Linear

  def __init__(self, key: jax.Array, norm: Callable[[int], Any] = NORMS['jaxbn'], num_classes=10):
    keys = iter(jax.random.split(key, 10))
    init = lambda layer: _xavier_zero_bias(layer, next(keys))
    self.conv1, self.bn1 = init(eqx.nn.Conv2d(1, 6, 5, key=next(keys))), norm(6)
    self.conv2, self.bn2 = init(eqx.nn.Conv2d(6, 16, 5, key=next(keys))), norm(16)
    self.fc1, self.bn3 = init(eqx.nn.Linear(16 * 4 * 4, 120, key=next(keys))), norm(120)
    self.fc2, self.bn4 = init(eqx.nn.Linear(120, 84, key=next(keys))), norm(84)
    self.fc3 = init(eqx.nn.Linear(84, num_classes, key=next(keys)))

  def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
    """Maps one (1, 28, 28) image to (num_classes,) logits, and the new state."""
    h, state = self.bn1(self.conv1(x), state)
    h = max_pool_2x2(jax.nn.sigmoid(h))
    h, state = self.bn2(self.conv2(h), state)
    h = max_pool_2x2(jax.nn.sigmoid(h)).reshape(-1)
    h, state = self.bn3(self.fc1(h), state)
    h, state = self.bn4(self.fc2(jax.nn.sigmoid(h)), state)
    return self.fc3(jax.nn.sigmoid(h)), state


def forward(model: LeNet, state: eqx.nn.State, images: jax.Array) -> tuple[jax.Array, Any]:
  """Logits (N, 10) of images (N, 1, 28, 28): the model vmapped over the named batch axis."""
  return jax.vmap(model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))(images, state)


def loss_fn(model, state, images, labels):
  logits, state = forward(model, state, images)
  log_probs = jax.nn.log_softmax(logits)
  return -jnp.take_along_axis(log_probs, labels[:, None], axis=1).mean(), state


@eqx.filter_jit
def train_step(model, state, images, labels, learning_rate):
  """One SGD step: batch statistics in the BN layers, their running averages updated."""
  (loss, state), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(
    model, state, images, labels
  )
  model = eqx.apply_updates(model, jax.tree.map(lambda g: -learning_rate * g, grads))
  return model, state, loss


@eqx.filter_jit
def accuracy(model, state, images, labels):
  """Accuracy in inference mode: the BN layers normalise with their running statistics."""
  logits, _ = forward(eqx.nn.inference_mode(model), state, images)
  return (logits.argmax(-1) == labels).mean()


def synthetic_data(num_train: int, num_test: int, seed: int) -> dict[str, np.ndarray]:
  """Images (N, 1, 28, 28): one of 10 random templates per class, plus noise."""
  rng = np.random.default_rng(seed)
  templates = rng.uniform(0, 1, (10, 1, 28, 28)).astype(np.float32)

  def split(n):
    labels = rng.integers(0, 10, n).astype(np.int32)
    noise = rng.normal(0, 0.5, (n, 1, 28, 28)).astype(np.float32)
    return templates[labels] + noise, labels

  (xtr, ytr), (xte, yte) = split(num_train), split(num_test)
  return {'train_images': xtr, 'train_labels': ytr, 'test_images': xte, 'test_labels': yte}


def fashion_mnist(num_train: int, num_test: int) -> dict[str, np.ndarray]:
  """Fashion-MNIST (`d2l_lenet.data`), channels first; 0 keeps all examples."""
  # d2l_lenet runs from the checkout (it is not in jaxbn's wheel), beside examples/.
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from d2l_lenet.data import load_fashion_mnist

  data = load_fashion_mnist().subset(num_train, num_test)
  nchw = lambda images: np.ascontiguousarray(images.transpose(0, 3, 1, 2))
  return {
    'train_images': nchw(data.train_images),
    'train_labels': data.train_labels,
    'test_images': nchw(data.test_images),
    'test_labels': data.test_labels,
  }


def train(args: argparse.Namespace, data: dict[str, np.ndarray]) -> dict[str, float]:
  """Trains `LeNet` as ``args`` says; returns the last loss and the test accuracies."""
  key, shuffle_key = jax.random.split(jax.random.key(args.seed))
  model, state = eqx.nn.make_with_state(LeNet)(key, NORMS[args.norm])
  images, labels = data['train_images'], data['train_labels']
  steps_per_epoch = len(images) // args.batch_size
  steps = args.steps or args.epochs * steps_per_epoch
  order, loss, start = None, float('nan'), time.perf_counter()
  for step in range(steps):
    if step % steps_per_epoch == 0:
      shuffle_key, k = jax.random.split(shuffle_key)
      order = np.asarray(jax.random.permutation(k, len(images)))
    batch = order[(step % steps_per_epoch) * args.batch_size :][: args.batch_size]
    model, state, loss = train_step(model, state, images[batch], labels[batch], args.lr)
    if (step + 1) % steps_per_epoch == 0 or step + 1 == steps:
      loss = float(loss)
      if not np.isfinite(loss):
        raise FloatingPointError(f'loss {loss} at step {step + 1}')
      acc = float(accuracy(model, state, data['test_images'], data['test_labels']))
      print(f'step {step + 1}/{steps}: loss {loss:.3f}, test accuracy {acc:.3f}')
  seconds = time.perf_counter() - start
  print(f'{steps * args.batch_size / seconds:,.0f} examples/s (compilation included)')
  metrics = {'loss': loss, 'test_accuracy': acc}
  if args.precise:
    # The running averages become the equal-weight average of the batch
    # statistics over the training set, with the final weights.
    state = jaxbn.equinox.precise_batch_stats(forward, model, state, images, args.batch_size)
    metrics['precise_test_accuracy'] = float(
      accuracy(model, state, data['test_images'], data['test_labels'])
    )
    print(f'with precise BN statistics: test accuracy {metrics["precise_test_accuracy"]:.3f}')
  return metrics


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--data', choices=('fashion', 'synthetic'), default='fashion')
  parser.add_argument('--norm', choices=tuple(NORMS), default='jaxbn')
  parser.add_argument('--epochs', type=int, default=1)
  parser.add_argument('--steps', type=int, default=0, help='steps in all (0: --epochs)')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--lr', type=float, default=1.0)
  parser.add_argument('--train-size', type=int, default=0, help='examples (0: all)')
  parser.add_argument('--test-size', type=int, default=0, help='examples (0: all)')
  parser.add_argument('--precise', action='store_true', help='precise BN statistics at the end')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  if args.data == 'fashion':
    data = fashion_mnist(args.train_size, args.test_size)
  else:
    data = synthetic_data(args.train_size or 2048, args.test_size or 512, args.seed)
  return train(args, data)


if __name__ == '__main__':
  main()
