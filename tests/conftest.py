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


def pytest_collection_modifyitems(config, items):
  """tests/test_parallel.py runs in two sessions: keep each test in its own.

  `on_8_devices` tests need 8 host devices (XLA_FLAGS, set before JAX starts,
  by the subprocess of test_on_8_host_devices); `main_session` tests run in
  the ordinary session. The others are deselected, not skipped.
  """
  eight = jax.device_count() == 8
  keep, drop = [], []
  for item in items:
    wrong = item.get_closest_marker('on_8_devices' if not eight else 'main_session')
    (drop if wrong else keep).append(item)
  if drop:
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
