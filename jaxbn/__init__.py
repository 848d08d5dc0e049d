"""jaxbn: batch normalization in JAX, from scratch, as in Dive into Deep Learning."""

# The tools built on the layer, as jaxbn.folding.fold and jaxbn.precise.precise_batch_stats.
from jaxbn import folding as folding
from jaxbn import precise as precise
from jaxbn._functional import BatchNormOutput, SingleValueWarning, batch_norm
from jaxbn._renorm import renorm_correction, renorm_schedule
from jaxbn._running import cumulative_update, ema_update, unbiased_variance
from jaxbn.linen import BatchNorm
from jaxbn.statistics import batch_statistics

__all__ = [
  'BatchNorm',
  'BatchNormOutput',
  'SingleValueWarning',
  'batch_norm',
  'batch_statistics',
  'cumulative_update',
  'ema_update',
  'renorm_correction',
  'renorm_schedule',
  'unbiased_variance',
]
__version__ = '0.1.0'
