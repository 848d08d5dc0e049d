r"""LeNet-BN with precise statistics: running averages recomputed over the training set.

  python train.py --config configs/lenet_bn_precise.py

After every epoch the BN layers' running mean and variance are replaced by the
average batch statistics of the final weights over all 60,000 training images
(jaxbn.precise). metrics.jsonl then holds test_accuracy (precise statistics)
and test_accuracy_running (the EMAs, as the chapter evaluates).
"""

from configs import lenet_bn


def get_config():
  config = lenet_bn.get_config()
  config.bn.precise_examples = 60000
  return config
