"""jaxbn: batch normalization in JAX, from scratch, as in Dive into Deep Learning."""

from jaxbn.functional import BatchNormOutput, batch_norm, batch_statistics, renorm_schedule
from jaxbn.linen import BatchNorm

__all__ = ['BatchNorm', 'BatchNormOutput', 'batch_norm', 'batch_statistics', 'renorm_schedule']
__version__ = '0.1.0'
