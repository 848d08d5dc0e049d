"""D2L's LeNet with batch normalization in PyTorch, written as the chapter writes it.

The reference for ``benchmarks/throughput.py``: the from-scratch ``batch_norm``
function and ``BatchNorm`` module of D2L's batch-norm chapter (momentum 0.9 is
the weight of the old running average, as in jaxbn and Flax), or PyTorch's
``nn.BatchNorm2d`` / ``nn.BatchNorm1d``, in the chapter's LeNet: conv 6@5x5 ->
BN -> sigmoid -> max-pool 2, conv 16@5x5 -> BN -> sigmoid -> max-pool 2, dense
120 -> BN -> sigmoid, dense 84 -> BN -> sigmoid, dense 10. Inputs are NCHW
(N, 1, 28, 28) float32; weights are Xavier-uniform and the optimizer is SGD,
as ``d2l.train_ch6`` sets them up.
"""

import warnings

import numpy as np
import torch
from torch import nn

NORMS = ('scratch', 'nn')


def batch_norm(X, gamma, beta, moving_mean, moving_var, eps, momentum):
  # Use `is_grad_enabled` to determine whether we are in training mode.
  if not torch.is_grad_enabled():
    # In prediction mode, use the mean and variance of the moving average.
    X_hat = (X - moving_mean) / torch.sqrt(moving_var + eps)
  else:
    assert len(X.shape) in (2, 4)
    if len(X.shape) == 2:
      # Fully connected layer: statistics over the feature dimension.
      mean = X.mean(dim=0)
      var = ((X - mean) ** 2).mean(dim=0)
    else:
      # Convolutional layer: statistics per channel (axis=1), keeping the
      # shape of `X` for broadcasting.
      mean = X.mean(dim=(0, 2, 3), keepdim=True)
      var = ((X - mean) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    # In training mode, the current mean and variance are used.
    X_hat = (X - mean) / torch.sqrt(var + eps)
    # Update the mean and variance using the moving average.
    moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
    moving_var = momentum * moving_var + (1.0 - momentum) * var
  Y = gamma * X_hat + beta  # Scale and shift.
  return Y, moving_mean.data, moving_var.data


class BatchNorm(nn.Module):
  # `num_features`: outputs of a fully connected layer or output channels of a
  # convolutional layer. `num_dims`: 2 for a fully connected layer, 4 for a
  # convolutional layer.
  def __init__(self, num_features, num_dims):
    super().__init__()
    shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
    # The scale and shift parameters, initialized to 1 and 0.
    self.gamma = nn.Parameter(torch.ones(shape))
    self.beta = nn.Parameter(torch.zeros(shape))
    # The non-parameter variables, initialized to 0 and 1.
    self.moving_mean = torch.zeros(shape)
    self.moving_var = torch.ones(shape)

  def forward(self, X):
    # Copy `moving_mean` and `moving_var` to the device of `X` if needed.
    if self.moving_mean.device != X.device:
      self.moving_mean = self.moving_mean.to(X.device)
      self.moving_var = self.moving_var.to(X.device)
    # Save the updated `moving_mean` and `moving_var`.
    Y, self.moving_mean, self.moving_var = batch_norm(
      X, self.gamma, self.beta, self.moving_mean, self.moving_var, eps=1e-5, momentum=0.9
    )
    return Y


def lenet(norm: str = 'nn') -> nn.Sequential:
  """The chapter's LeNet-BN with ``'scratch'`` (D2L's BatchNorm) or ``'nn'`` (nn.BatchNorm*d)."""
  if norm not in NORMS:
    raise ValueError(f'norm={norm!r} is not one of {NORMS}.')
  if norm == 'scratch':
    bn2d, bn1d = (lambda n: BatchNorm(n, num_dims=4)), (lambda n: BatchNorm(n, num_dims=2))
  else:
    bn2d, bn1d = nn.BatchNorm2d, nn.BatchNorm1d
  net = nn.Sequential(
    nn.Conv2d(1, 6, kernel_size=5), bn2d(6), nn.Sigmoid(),
    nn.MaxPool2d(kernel_size=2, stride=2),
    nn.Conv2d(6, 16, kernel_size=5), bn2d(16), nn.Sigmoid(),
    nn.MaxPool2d(kernel_size=2, stride=2), nn.Flatten(),
    nn.Linear(16 * 4 * 4, 120), bn1d(120), nn.Sigmoid(),
    nn.Linear(120, 84), bn1d(84), nn.Sigmoid(),
    nn.Linear(84, 10),
  )  # fmt: skip

  def init_weights(m):
    if type(m) in (nn.Linear, nn.Conv2d):
      nn.init.xavier_uniform_(m.weight)

  net.apply(init_weights)
  return net


class Trainer:
  """``d2l.train_ch6``'s inner loop: one SGD step per batch, with its loss and accuracy sums."""

  def __init__(self, net: nn.Module, lr: float):
    self.net = net.train()
    self.loss = nn.CrossEntropyLoss()
    self.optimizer = torch.optim.SGD(net.parameters(), lr=lr)

  def step(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Trains on (B, 1, 28, 28) images and (B,) int64 labels; returns (loss sum, correct)."""
    self.optimizer.zero_grad()
    y_hat = self.net(X)
    loss = self.loss(y_hat, y)
    loss.backward()
    self.optimizer.step()
    with torch.no_grad():
      return float(loss) * X.shape[0], float((y_hat.argmax(dim=1) == y).sum())


def to_nchw(images: np.ndarray) -> torch.Tensor:
  """jaxbn's (N, 28, 28, 1) float32 images as a contiguous (N, 1, 28, 28) tensor."""
  return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


class FashionMNIST(torch.utils.data.Dataset):
  """What ``torchvision.datasets.FashionMNIST(transform=ToTensor())`` serves, item by item.

  Each item is a PIL image of the uint8 pixels, converted to a (1, 28, 28)
  float tensor in [0, 1] as ``ToTensor`` does.
  """

  def __init__(self, images, labels):
    # jaxbn's (N, 28, 28, 1) floats k / 255, back to the uint8 pixels k.
    self.images, self.labels = np.rint(images[..., 0] * 255).astype(np.uint8), labels

  def __len__(self):
    return len(self.labels)

  def __getitem__(self, i):
    from PIL import Image

    image = Image.fromarray(self.images[i], mode='L')
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0)[None], int(self.labels[i])


def batches(loader: str, images, labels, batch_size: int, train: bool):
  """Batches of (N, 1, 28, 28) float32 images and int64 labels.

  ``'d2l'``: ``d2l.load_data_fashion_mnist``'s DataLoader (4 workers,
  shuffled for training, per-item conversion); ``'memory'``: slices of
  tensors held in memory.
  """
  if loader == 'd2l':
    warnings.filterwarnings('ignore', 'This DataLoader will create 4 worker processes')
    return torch.utils.data.DataLoader(
      FashionMNIST(images, labels), batch_size, shuffle=train, num_workers=4
    )
  x = to_nchw(images)
  y = torch.from_numpy(labels).long()
  order = torch.randperm(len(y)) if train else torch.arange(len(y))
  return [(x[i], y[i]) for i in order.split(batch_size)]


def main(argv=None) -> None:
  """``d2l.train_ch6`` of the chapter's LeNet-BN on Fashion-MNIST, timed from start to end."""
  import argparse
  import json
  import pathlib
  import sys
  import time

  start = time.perf_counter()
  parser = argparse.ArgumentParser(description="D2L's PyTorch LeNet-BN trained on Fashion-MNIST.")
  parser.add_argument('--norm', choices=NORMS, default='nn')
  parser.add_argument('--loader', choices=('d2l', 'memory'), default='d2l')
  parser.add_argument('--epochs', type=int, default=10)
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument('--lr', type=float, default=1.0)
  parser.add_argument('--seed', type=int, default=0, help='torch.manual_seed')
  parser.add_argument(
    '--metrics', type=pathlib.Path, help="write one JSON record per epoch here, as train.py's"
  )
  args = parser.parse_args(argv)
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
  from d2l_lenet import data

  torch.set_num_threads(2)
  torch.manual_seed(args.seed)
  dataset = data.load_fashion_mnist()
  trainer = Trainer(lenet(args.norm), lr=args.lr)
  n = len(dataset.train_labels)
  load = lambda images, labels, train: batches(args.loader, images, labels, args.batch_size, train)
  records = []
  for epoch in range(1, args.epochs + 1):
    trainer.net.train()
    loss_sum = correct = 0.0
    epoch_start = time.perf_counter()
    for X, y in load(dataset.train_images, dataset.train_labels, True):
      loss, right = trainer.step(X, y)
      loss_sum, correct = loss_sum + loss, correct + right
    train_seconds = time.perf_counter() - epoch_start
    trainer.net.eval()
    right = 0.0
    with torch.no_grad():
      for X, y in load(dataset.test_images, dataset.test_labels, False):
        right += float((trainer.net(X).argmax(dim=1) == y).sum())
    records.append({
      'epoch': epoch,
      'train_loss': loss_sum / n,
      'train_accuracy': correct / n,
      'test_accuracy': right / len(dataset.test_labels),
      'train_examples': n,
      'train_seconds': train_seconds,
      'examples_per_sec': n / train_seconds,
    })  # fmt: skip
    print(
      f'epoch {epoch}: loss {loss_sum / n:.3f}, train acc {correct / n:.3f}, '
      f'test acc {right / len(dataset.test_labels):.3f}',
      flush=True,
    )
  if args.metrics:
    args.metrics.parent.mkdir(parents=True, exist_ok=True)
    args.metrics.write_text(''.join(json.dumps(r) + '\n' for r in records))
  print(f'{time.perf_counter() - start:.1f} s from start to end')


if __name__ == '__main__':
  main()
