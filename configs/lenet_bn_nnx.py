r"""The chapter's LeNet-BN in Flax NNX: models.NNXLeNet with jaxbn.nnx.BatchNorm.

  python train.py --config configs/lenet_bn_nnx.py

The same model, data, steps, checkpoints and outputs as configs/lenet_bn.py
(the NNX model trains through d2l_lenet.nnx_apply.as_apply); --config.norm=flax
takes flax.nnx.BatchNorm instead.
"""

from configs import lenet_bn


def get_config():
  config = lenet_bn.get_config()
  config.api = 'nnx'
  return config
