"""Test configuration: CPU only, and silent JAX mistakes turned into errors.

This runs before the test modules import jaxbn, so the settings apply to the
library code under test as well as to Flax (which works with all of them).
"""

import os

# CPU unless the caller chose otherwise; must be set before JAX initialises.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import hypothesis
import jax

# Implicit broadcasting of arrays of different ranks, e.g. (C,) against
# (N, H, W, C) or (N, 1) against (N,), is the classic batch-norm bug: raise
# instead of broadcasting. (Scalars still broadcast.)
jax.config.update('jax_numpy_rank_promotion', 'raise')
# Reusing a PRNG key (identical "random" values in two places) is an error.
jax.config.update('jax_debug_key_reuse', True)
# Not set: jax_check_tracer_leaks (every eager op gets ~100x slower; see
# TracerLeakTest in test_linen.py), jax_debug_nans (tests feed NaN padding on
# purpose), jax_numpy_dtype_promotion='strict' (Flax mixes bfloat16 inputs
# with float32 statistics).

# Property tests: few examples, no deadline (the first example of each shape
# compiles), and no example database written into the repository.
hypothesis.settings.register_profile(
  'jaxbn',
  max_examples=25,
  deadline=None,
  database=None,
  print_blob=True,
)
# HYPOTHESIS_PROFILE=thorough for a longer search, e.g. after changing the maths.
hypothesis.settings.register_profile(
  'thorough', parent=hypothesis.settings.get_profile('jaxbn'), max_examples=1000
)
hypothesis.settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'jaxbn'))
