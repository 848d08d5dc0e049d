r"""Mutation testing: put deliberate bugs into a copy of jaxbn and check that a test fails.

  python tests/mutants.py              # every mutant (make mutants)
  python tests/mutants.py --list       # their names
  python tests/mutants.py --only data  # those whose name contains 'data'

Each mutant replaces one exact piece of code (it must occur once) in a fresh
copy of the repository and runs the tests that guard it; a mutant that no
test notices *survives*, which means a test is still to be written. Exits
non-zero if any mutant survives or no longer applies (its code has changed:
update the mutant with the code).

To add one: a `Mutant` with a name saying what the bug is, the file, the
original text, its replacement, and the test files to run.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
COPIED = (
  'jaxbn',
  'd2l_lenet',
  'tests',
  'configs',
  'benchmarks',
  'train.py',
  'pyproject.toml',
  'README.md',
)


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str
  original: str
  mutated: str
  tests: tuple[str, ...]


MUTANTS = (
  Mutant(
    'running: momentum weighs the batch, not the running average',
    'jaxbn/_running.py',
    'momentum * r + (1.0 - momentum) * b',
    '(1.0 - momentum) * r + momentum * b',
    ('tests/test_pieces.py', 'tests/test_functional.py'),
  ),
  Mutant(
    'running: the unbiased variance divides by n, not n - 1',
    'jaxbn/_running.py',
    'return var * count / jnp.maximum(count - 1, 1)',
    'return var * count / jnp.maximum(count, 1)',
    ('tests/test_functional.py', 'tests/test_torch_parity.py'),
  ),
  Mutant(
    'running: the cumulative average weighs by 1 / count',
    'jaxbn/_running.py',
    '+ 1.0)\n    return r + weight * (b - r)',
    ')\n    return r + weight * (b - r)',
    ('tests/test_functional.py', 'tests/test_linen.py'),
  ),
  Mutant(
    'statistics: no second pass when the shift is far from the mean',
    'jaxbn/statistics.py',
    'imprecise = jnp.any(abs_square(offset) > 4.0 * var)',
    'imprecise = jnp.any(abs_square(offset) > 4e30 * var)',
    ('tests/test_functional.py',),
  ),
  Mutant(
    'statistics: a masked mean divides by the batch size',
    'jaxbn/statistics.py',
    'return own_dtype([s / jnp.maximum(count, 1) for s in sums])',
    'return own_dtype([s / values[0][..., :1].size for s in sums])',
    ('tests/test_functional.py',),
  ),
  Mutant(
    'statistics: the rows of a fast feature sum are grouped by feature, not by row',
    'jaxbn/statistics.py',
    '.sum(0).reshape(k, -1).sum(0)',
    '.sum(0).reshape(-1, k).sum(1)',
    ('tests/test_pieces.py', 'tests/test_functional.py'),
  ),
  Mutant(
    'statistics: broadcast_features repeats each feature instead of tiling them',
    'jaxbn/statistics.py',
    'line = jnp.tile(v, k)',
    'line = jnp.repeat(v, k)',
    ('tests/test_pieces.py', 'tests/test_functional.py'),
  ),
  Mutant(
    'statistics: complex variance as E[(x - mean)^2]',
    'jaxbn/statistics.py',
    'return lax.square(x.real) + lax.square(x.imag)',
    'return lax.square(x)',
    ('tests/test_functional.py',),
  ),
  Mutant(
    "normalize: the derivative ignores the mask's selection",
    'jaxbn/_normalize.py',
    '(x_dot, x_hat * x_dot), how.axes, mask, how.axis_name, how.axis_index_groups, count',
    '(x_dot, x_hat * x_dot), how.axes, None, how.axis_name, how.axis_index_groups, None',
    ('tests/test_functional.py',),
  ),
  Mutant(
    'normalize: autodiff of the formula instead of the closed-form derivative',
    'jaxbn/_normalize.py',
    'if axis_name is None and not jnp.iscomplexobj(x):',
    'if False:',
    ('tests/test_pieces.py',),
  ),
  Mutant(
    "normalize: the variance's tangent is halved",
    'jaxbn/_normalize.py',
    '(y_dot, mean_dot, 2.0 * x_hat_x_dot / rstd)',
    '(y_dot, mean_dot, x_hat_x_dot / rstd)',
    ('tests/test_functional.py',),
  ),
  Mutant(
    'ghost: the running averages take the first group, not the mean',
    'jaxbn/_ghost.py',
    'return jax.tree.map(lambda s: s.mean(0), stats)',
    'return jax.tree.map(lambda s: s[0], stats)',
    ('tests/test_extensions.py',),
  ),
  Mutant(
    'renorm: d has the wrong sign',
    'jaxbn/_renorm.py',
    'd = jnp.clip((batch_mean - mean) / running_std, -dmax, dmax)',
    'd = jnp.clip((mean - batch_mean) / running_std, -dmax, dmax)',
    ('tests/test_extensions.py',),
  ),
  Mutant(
    'precise: unbiased layers get the biased variance',
    'jaxbn/precise.py',
    'var = unbiased_variance(var, value_count(h, reduction_axes))',
    'var = var',
    ('tests/test_precise.py',),
  ),
  Mutant(
    'precise: NNX layers with unbiased_running_var get the biased variance',
    'jaxbn/precise.py',
    'input_statistics(args[0], bn.axis, unbiased)',
    'input_statistics(args[0], bn.axis, False)',
    ('tests/test_precise.py',),
  ),
  Mutant(
    'precise: the second batch is left out of the average',
    'jaxbn/precise.py',
    'for i in range(1, num_batches):',
    'for i in range(2, num_batches):',
    ('tests/test_precise.py',),
  ),
  Mutant(
    'precise: the NNX model is run in inference mode',
    'jaxbn/precise.py',
    '  model.train()\n  index =',
    '  model.eval()\n  index =',
    ('tests/test_precise.py',),
  ),
  Mutant(
    "steps: the NNX model's precise statistics are not computed for its train state",
    'd2l_lenet/steps.py',
    '  precise.precise_batch_stats_nnx(nnx_model, images, batch_size)\n',
    '',
    ('tests/test_nnx_lenet.py',),
  ),
  Mutant(
    'data: the cache is accepted on its shapes alone',
    'd2l_lenet/data.py',
    'hashlib.sha256(_idx_bytes(arrays[key])).hexdigest() != IDX_SHA256[name]',
    'False',
    ('tests/test_data.py',),
  ),
  Mutant(
    'data: a prepared tfds copy is downloaded again',
    'd2l_lenet/data.py',
    'return _load_tfds(data_dir, download=False)',
    'return _load_tfds(data_dir, download=True)',
    ('tests/test_data.py',),
  ),
  Mutant(
    'data: the IDX checksum is not checked',
    'd2l_lenet/data.py',
    'if digest != IDX_SHA256[name]:',
    'if False:',
    ('tests/test_data.py',),
  ),
  Mutant(
    "folding: the BN layer's epsilon is ignored",
    'jaxbn/folding.py',
    'layers[bn].epsilon,',
    '0.0,',
    ('tests/test_folding.py',),
  ),
  Mutant(
    "folding: the BN layer's bias is forgotten",
    'jaxbn/folding.py',
    "folded_bias = folded_bias + bn_params['bias']",
    'folded_bias = folded_bias',
    ('tests/test_folding.py',),
  ),
  Mutant(
    "folding (NNX): the BN layer's epsilon is ignored",
    'jaxbn/folding.py',
    '    bn.epsilon,\n',
    '    0.0,\n',
    ('tests/test_folding_nnx.py',),
  ),
  Mutant(
    'folding (NNX): a layer without a bias gets none',
    'jaxbn/folding.py',
    'linear.bias, linear.use_bias = nnx.Param(bias), True',
    'pass',
    ('tests/test_folding_nnx.py',),
  ),
  Mutant(
    'folding (NNX): an output also used elsewhere is folded',
    'jaxbn/_fold_pairs_nnx.py',
    'plan(trace, pairs, used_elsewhere(probe_fn, (state, arrays), trace, pairs))',
    'plan(trace, pairs, set())',
    ('tests/test_folding_nnx.py',),
  ),
  Mutant(
    'folding (NNX): a BN layer in training mode is folded',
    'jaxbn/_fold_pairs_nnx.py',
    'refuse_training(path, layer, args, kwargs)',
    'pass',
    ('tests/test_folding_nnx.py',),
  ),
  Mutant(
    'folding: register_linear does not register a linen layer',
    'jaxbn/folding.py',
    '    LINEN_LINEAR.add(layer_type)',
    '    pass',
    ('tests/test_folding.py',),
  ),
  Mutant(
    "layers: a BN call's use_running_average does not override the layer's",
    'jaxbn/_layers.py',
    'return not (bn.use_running_average if call is None else call)',
    'return not bn.use_running_average',
    ('tests/test_precise.py', 'tests/test_folding_nnx.py'),
  ),
  Mutant(
    'settings: NaN and infinity pass a number field',
    'd2l_lenet/settings.py',
    'if not isinstance(value, number) or not math.isfinite(value):',
    'if not isinstance(value, number):',
    ('tests/test_settings.py',),
  ),
  Mutant(
    'settings: num_processes without a coordinator is ignored',
    'd2l_lenet/settings.py',
    '  _check_distributed(config.distributed)\n',
    '',
    ('tests/test_settings.py',),
  ),
  Mutant(
    "equinox: batch mode's variance keeps Equinox's start correction (too large by m^k/(1-m^k))",
    'jaxbn/equinox.py',
    'jnp.maximum(var - w, 0) / (1 - w)',
    'var / (1 - w)',
    ('tests/test_equinox.py',),
  ),
  Mutant(
    'kernels: the band of the banded convolution is shifted by one column',
    'd2l_lenet/kernels.py',
    'np.eye(width, block, -dj, dtype=np.float32)',
    'np.eye(width, block, -dj - 1, dtype=np.float32)',
    ('tests/test_kernels.py',),
  ),
  Mutant(
    "kernels: the windows' transpose shifts each kernel row's cotangent the wrong way",
    'd2l_lenet/kernels.py',
    'jnp.pad(g[:, :, :, di], ((0, 0), (di, kh - 1 - di), (0, 0), (0, 0), (0, 0)))',
    'jnp.pad(g[:, :, :, di], ((0, 0), (kh - 1 - di, di), (0, 0), (0, 0), (0, 0)))',
    ('tests/test_kernels.py',),
  ),
  Mutant(
    'kernels: the banded convolution leaves the bias out',
    'd2l_lenet/kernels.py',
    'return y + statistics.broadcast_features(bias, y.shape, (0, 1, 2))',
    'return y',
    ('tests/test_kernels.py',),
  ),
  Mutant(
    'kernels: BandedConv takes strided convolutions for VALID stride-1 ones',
    'd2l_lenet/kernels.py',
    "'strides 1': ones(conv.strides),",
    "'strides 1': True,",
    ('tests/test_kernels.py',),
  ),
  Mutant(
    "kernels: tied maxima each take the window's whole gradient",
    'd2l_lenet/kernels.py',
    'share = g / sum((qi == m).astype(g.dtype) for qi in q)',
    'share = g',
    ('tests/test_kernels.py',),
  ),
  Mutant(
    'trainer: non-finite parameters go unnoticed',
    'd2l_lenet/trainer.py',
    'if not bool(_all_finite(state.params)):',
    'if False:',
    ('tests/test_reliability.py',),
  ),
  Mutant(
    'trainer: a non-finite loss goes unnoticed',
    'd2l_lenet/trainer.py',
    'if bad.size:',
    'if False:',
    ('tests/test_reliability.py',),
  ),
  Mutant(
    'nnx_apply: the NNX model always runs in training mode',
    'd2l_lenet/nnx_apply.py',
    'model.train() if train else model.eval()',
    'model.train()',
    ('tests/test_nnx_lenet.py',),
  ),
  Mutant(
    'nnx: the mask is not passed to batch_norm',
    'jaxbn/nnx.py',
    '      count=None if self.count is None else self.count[...],\n      mask=mask,',
    '      count=None if self.count is None else self.count[...],\n      mask=None,',
    ('tests/test_nnx.py',),
  ),
  Mutant(
    'data: images are not scaled to [0, 1]',
    'd2l_lenet/data.py',
    'u8.astype(np.float32) / 255.0',
    'u8.astype(np.float32)',
    ('tests/test_data.py',),
  ),
  Mutant(
    'linen: init updates the running statistics',
    'jaxbn/linen.py',
    'if not initializing and not use_running_average:',
    'if not use_running_average:',
    ('tests/test_linen.py',),
  ),
  Mutant(
    'linen: the cumulative count is not incremented',
    'jaxbn/linen.py',
    'count.value = count.value + 1',
    'count.value = count.value',
    ('tests/test_linen.py',),
  ),
  Mutant(
    'workdir: a workdir of another config is reused',
    'd2l_lenet/workdir.py',
    '    if changed:\n',
    '    if False:\n',
    ('tests/test_workdir.py',),
  ),
  Mutant(
    'benchmarks: a ratio is over the reference process before the variant only',
    'benchmarks/separate.py',
    '(before * after) ** 0.5',
    'before',
    ('tests/test_benchmarks.py::test_separate_processes_put_the_reference_around_each_variant',),
  ),
  Mutant(
    'batch_norm: the mask is dropped with the cumulative average (momentum=None)',
    'jaxbn/_functional.py',
    '  if mask is not None:\n    mask, _ = split_batch(',
    '  if momentum is None:\n    mask = None\n  if mask is not None:\n    mask, _ = split_batch(',
    ('tests/test_combinations.py',),
  ),
  Mutant(
    "batch_norm: the unbiased factor of virtual batches counts the whole batch's values",
    'jaxbn/_functional.py',
    'n = value_count(xg, group_axes, mask, axis_name, axis_index_groups)',
    'n = groups * value_count(xg, group_axes, mask, axis_name, axis_index_groups)',
    ('tests/test_combinations.py',),
  ),
  Mutant(
    'batch_norm: half-precision inputs get statistics in their own dtype',
    'jaxbn/_functional.py',
    'stats_dtype = jnp.result_type(x, jnp.float32) if force_float32_reductions else x.dtype',
    'stats_dtype = x.dtype',
    ('tests/test_combinations.py',),
  ),
  Mutant(
    'measures: the covariate shift moves the layer itself, not only the layers below',
    'd2l_lenet/measures.py',
    'new_params[key] if key in below else value',
    'new_params[key] if key in below or key in group else value',
    ('tests/test_measures.py',),
  ),
  Mutant(
    'measures: beta-smoothness per unit of step size, not of distance moved',
    'd2l_lenet/measures.py',
    'jnp.max(changes / (step_sizes * grad_norm))',
    'jnp.max(changes / step_sizes)',
    ('tests/test_measures.py',),
  ),
  Mutant(
    'measures: the loss range leaves out the loss at w',
    'd2l_lenet/measures.py',
    'all_losses = jnp.concatenate([loss0[None], losses])',
    'all_losses = losses',
    ('tests/test_measures.py',),
  ),
  Mutant(
    'variants: noisy BN adds its noise in inference too',
    'd2l_lenet/variants.py',
    '    if self.use_running_average:\n',
    '    if False:\n',
    ('tests/test_measures.py',),
  ),
)


def apply(mutant: Mutant, root: pathlib.Path) -> None:
  path = root / mutant.path
  text = path.read_text()
  if text.count(mutant.original) != 1:
    raise LookupError(
      f'{mutant.path} holds {text.count(mutant.original)} copies of the code of mutant '
      f'{mutant.name!r}: update the mutant in tests/mutants.py to the code as it is.'
    )
  path.write_text(text.replace(mutant.original, mutant.mutated))


def run(mutant: Mutant) -> tuple[str, float]:
  """``'killed'``, ``'survived'`` or ``'stale'`` (the code is no longer there), and seconds."""
  start = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix='jaxbn-mutant-') as tmp:
    root = pathlib.Path(tmp)
    for name in COPIED:
      if (ROOT / name).is_dir():
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns('__pycache__'))
      else:
        shutil.copy(ROOT / name, root / name)
    try:
      apply(mutant, root)
    except LookupError as e:
      print(f'  {e}')
      return 'stale', time.perf_counter() - start
    command = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *mutant.tests]
    env = {**os.environ, 'PYTHONPATH': str(root), 'JAX_PLATFORMS': 'cpu'}
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
  # pytest: 1 = tests failed; anything else (2-5) is an error of the run itself.
  if done.returncode not in (0, 1):
    raise RuntimeError(f'pytest could not run for {mutant.name!r}:\n{done.stdout[-2000:]}')
  return ('killed' if done.returncode == 1 else 'survived'), time.perf_counter() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--list', action='store_true', help='print the mutants and exit')
  parser.add_argument('--only', default='', help='run the mutants whose name contains this')
  args = parser.parse_args(argv)
  mutants = [m for m in MUTANTS if args.only in m.name]
  if args.list or not mutants:
    print('\n'.join(m.name for m in mutants) or f'no mutant name contains {args.only!r}')
    return 0 if mutants else 2
  outcomes = {}
  for i, mutant in enumerate(mutants, 1):
    outcome, seconds = run(mutant)
    outcomes[mutant.name] = outcome
    print(f'[{i}/{len(mutants)}] {outcome:8s} {seconds:5.0f} s  {mutant.name}', flush=True)
  bad = [name for name, outcome in outcomes.items() if outcome != 'killed']
  print(f'\n{len(mutants) - len(bad)} of {len(mutants)} mutants killed.')
  for name in bad:
    print(f'  {outcomes[name]}: {name}')
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
