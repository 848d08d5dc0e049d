r"""Plain LeNet (no batch norm) at chapter 6's learning rate 0.9, for comparison.

  python train.py --config configs/lenet.py

Same layers as configs/lenet_bn.py without the BN layers (chapter 6 pads the
first convolution and uses average pooling; this keeps the BN model's layers so
the two differ only in normalisation).
"""

from configs import lenet_bn


def get_config():
  config = lenet_bn.get_config()
  config.norm = 'none'
  config.learning_rate = 0.9
  return config
