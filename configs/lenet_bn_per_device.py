r"""LeNet-BN on several devices, each normalising its own block of the batch.

  python train.py --config configs/lenet_bn_per_device.py

The global batch (batch_size, divisible by the number of devices) is split
into one block per device; with bn.stats='per_device' every BN layer
normalises each block with that block's statistics (as ghost BN does) instead
of the whole batch's, and the devices' running averages are averaged. On one
device it trains exactly as configs/lenet_bn.py. To try it on CPU:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python train.py --config configs/lenet_bn_per_device.py
"""

from configs import lenet_bn


def get_config():
  config = lenet_bn.get_config()
  config.bn.stats = 'per_device'
  return config
