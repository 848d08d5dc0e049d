r"""The chapter's concise variant: the same LeNet with flax.linen.BatchNorm.

python train.py --config configs/lenet_bn_flax.py
"""

from configs import lenet_bn


def get_config():
  config = lenet_bn.get_config()
  config.norm = 'flax'
  return config
