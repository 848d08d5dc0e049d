r"""LeNet with from-scratch batch norm (jaxbn.BatchNorm), as D2L's chapter trains it.

  python train.py --config configs/lenet_bn.py
  python train.py --config configs/lenet_bn.py --config.num_epochs=2 --workdir /tmp/run

Every field can be overridden as --config.FIELD=VALUE (--config.data.num_train=1024,
--config.bn.momentum=None); an unknown field is an error, and every value is checked against
its rule in d2l_lenet.settings.RULES before the run starts.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  # Flax API of the model: 'linen' (models.LeNet) or 'nnx' (models.NNXLeNet, with
  # jaxbn.nnx.BatchNorm or flax.nnx.BatchNorm); both train through the same steps.
  config.api = 'linen'
  # The BN layer: 'jaxbn' (from scratch), 'flax' (flax.linen.BatchNorm) or 'none' (plain LeNet).
  config.norm = 'jaxbn'
  # Convolution and max-pool: 'standard' (Flax's), 'banded' (d2l_lenet.kernels' XLA:CPU
  # forms) or 'auto' (banded on CPU).
  config.conv_impl = 'auto'

  config.bn = ml_collections.ConfigDict()
  # Decay of the running averages: ra = momentum * ra + (1 - momentum) * batch;
  # None: the cumulative average of all batches (--config.bn.momentum=None; jaxbn
  # only). Typed as object so that the command line accepts None as well as numbers.
  config.bn.momentum = ml_collections.FieldReference(0.9, field_type=object)
  config.bn.epsilon = 1e-5
  # Ghost batch norm: normalise each run of this many examples on its own (0: off;
  # jaxbn only).
  config.bn.virtual_batch_size = 0
  # Batch renormalization (Ioffe, 2017; jaxbn only): r clipped to [1/rmax, rmax], d to
  # [-dmax, dmax], widened from (1, 0) over the warm-up steps (rmax 0: off, and then
  # dmax and the warm-up stay 0).
  config.bn.renorm_rmax = 0.0
  config.bn.renorm_dmax = 0.0
  config.bn.renorm_warmup_steps = 0
  # On several devices (d2l_lenet.parallel), batch statistics over 'global': the whole
  # global batch (synchronized BN), or 'per_device': each device's block on its own
  # (as ghost BN does).
  config.bn.stats = 'global'
  # Precise BN: after each epoch, replace the running averages by the average
  # batch statistics over this many training examples (0: keep the running averages).
  config.bn.precise_examples = 0

  config.learning_rate = 1.0
  # The global batch: on several devices each takes an equal block of it.
  config.batch_size = 256
  config.num_epochs = 10
  config.seed = 0

  # Training steps compiled into one lax.scan call (rounded down to a divisor
  # of the steps per epoch: 26 of 234; 0: a whole epoch per call). 1
  # dispatches each step. Each call's metrics are read while the next runs,
  # so the device never waits; the progress bar moves once per call.
  config.steps_per_dispatch = 32
  config.eval_batch_size = 2000
  config.progress_bar = True

  # Multi-host start-up (jax.distributed.initialize). coordinator_address:
  # '' = one process; 'host:port' of process 0; 'auto' = let JAX detect the
  # cluster (SLURM, Open MPI, Kubernetes, Cloud TPU). num_processes 0 and
  # process_id -1 mean: taken from the cluster environment; other values need
  # a coordinator_address.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ''
  config.distributed.num_processes = 0
  config.distributed.process_id = -1

  config.data = ml_collections.ConfigDict()
  config.data.data_dir = (
    ''  # tfds data dir and jaxbn's cache; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  )
  config.data.idx_dir = '/usr/share/datasets/fashion-mnist'  # raw IDX files (Debian's package)
  config.data.download = True  # let tfds download it when nothing local is found
  config.data.num_train = 0  # use only the first N examples (0: all 60,000)
  config.data.num_test = 0  # (0: all 10,000)
  return config
