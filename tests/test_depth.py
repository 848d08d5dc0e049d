"""d2l_lenet.deep and experiments/depth.py: the wiring by hand, the scales at init from theory.

The scale facts hold for wide nets (width 256) on Gaussian inputs at He
initialisation, and each fails if a block is wired otherwise: without the
skip, without BN, with BN after the sum, or with a LeCun (1 / fan_in) init.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import chex
import jax
import numpy as np
import pytest

from d2l_lenet import deep

ROOT = pathlib.Path(__file__).resolve().parents[1]
VARIANTS = {
  'plain': {'norm': False, 'residual': False},
  'bn': {'norm': True, 'residual': False},
  'residual': {'norm': False, 'residual': True},
  'residual+bn': {'norm': True, 'residual': True},
}
WIDTH, DEPTH, BATCH = 256, 32, 256


def gaussian_batch(n=BATCH, seed=100):
  """(n, 28, 28, 1) standard normal images and (n,) labels."""
  images = jax.random.normal(jax.random.key(seed), (n, 28, 28, 1))
  labels = jax.random.randint(jax.random.key(seed + 1), (n,), 0, 10)
  return images, labels


def scales_at_init(seed=0, depth=DEPTH, width=WIDTH, **kind):
  model = deep.DeepMLP(depth=depth, width=width, **kind)
  images, labels = gaussian_batch()
  variables = model.init(jax.random.key(seed), images[:1], train=False)
  return deep.init_scales(model, variables, images, labels)


# --- the model, worked by hand --------------------------------------------------------------


def reference_forward(params, images, norm, residual, depth):
  """The model in numpy, training mode: BN with the biased batch variance and epsilon 1e-5.

  Returns the logits (N, 10) and the blocks' outputs (depth, N, width).
  """
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  relu = lambda z: np.maximum(z, 0.0)

  def bn(z, b):  # b: the BatchNorm's params, scale (gamma) and bias (beta)
    if not norm:
      return z
    return (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) * b['scale'] + b['bias']

  x = np.asarray(images, np.float64).reshape(len(images), -1)
  x = x @ p['stem']['kernel'] + p['stem']['bias']
  outs = []
  for i in range(depth):
    block = jax.tree.map(lambda a, i=i: a[i], p['blocks'])  # block i's slice of the stack
    dense = lambda z, d=block['Dense_0']: z @ d['kernel'] + d['bias']
    b = block.get('BatchNorm_0')
    x = x + dense(relu(bn(x, b))) if residual else relu(bn(dense(x), b))
    outs.append(x)
  if residual:
    x = relu(bn(x, p.get('BatchNorm_0')))
  return x @ p['head']['kernel'] + p['head']['bias'], np.stack(outs)


@pytest.mark.parametrize('variant', list(VARIANTS))
def test_forward_matches_the_blocks_written_out_by_hand(variant):
  kind, depth, width = VARIANTS[variant], 3, 16
  model = deep.DeepMLP(depth=depth, width=width, **kind)
  images, _ = gaussian_batch(32)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  # Random biases and BN scales too, so that one in the wrong place shows.
  leaves, tree = jax.tree.flatten(variables['params'])
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(
    tree, [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys, strict=True)]
  )
  logits, state = model.apply(
    {**variables, 'params': params}, images, train=True, mutable=['batch_stats', 'intermediates']
  )
  want_logits, want_outs = reference_forward(params, images, depth=depth, **kind)
  (block_out,) = state['intermediates']['blocks']['block_out']
  chex.assert_shape(block_out, (depth, 32, width))
  chex.assert_trees_all_close(block_out, want_outs.astype(np.float32), rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(logits, want_logits.astype(np.float32), rtol=1e-4, atol=1e-4)
  chex.assert_shape(params['blocks']['Dense_0']['kernel'], (depth, width, width))
  if kind['norm']:  # one set of running statistics per block, updated in training
    chex.assert_shape(state['batch_stats']['blocks']['BatchNorm_0']['mean'], (depth, width))
    assert not np.allclose(state['batch_stats']['blocks']['BatchNorm_0']['mean'], 0.0)
  else:
    assert 'batch_stats' not in variables
  # Evaluation uses the running averages and needs no mutable collection.
  chex.assert_shape(model.apply(variables, images, train=False), (32, 10))


def block_outputs(model, variables, images):
  """(depth, N, width): every block's output in training mode."""
  _, state = model.apply(variables, images, train=True, mutable=['batch_stats', 'intermediates'])
  return state['intermediates']['blocks']['block_out'][0]


@pytest.mark.parametrize('norm', [True, False])
def test_bn_makes_the_blocks_blind_to_the_input_scale_and_plain_relu_nets_are_homogeneous(norm):
  """With BN each block's output ignores a factor on the input; without, it carries it (bias 0)."""
  images, _ = gaussian_batch(64)
  model = deep.DeepMLP(depth=4, width=32, norm=norm)
  variables = model.init(jax.random.key(0), images[:1], train=False)
  small = block_outputs(model, variables, images)
  large = block_outputs(model, variables, images * 100.0)
  chex.assert_trees_all_close(large, small if norm else small * 100.0, rtol=1e-3, atol=1e-3)


# --- scales at initialisation, from theory --------------------------------------------------


def test_he_init_keeps_the_scale_of_a_plain_relu_net():
  """He: E[relu(z)^2] = Var(z) / 2 and Var(W h) = (2 / fan_in) |h|^2, so the scale stays.

  Per block the std changes by a few percent (LeCun init: 1 / sqrt(2) per
  block); over 32 blocks those changes make a random walk of log std (one seed
  of 8 ends at 0.28 of block 0), so the whole-depth factor is a geometric
  mean over seeds.
  """
  ratios = []
  for seed in range(4):
    std = scales_at_init(seed)['activation_std']
    chex.assert_shape(std, (DEPTH,))
    assert 0.9 < np.median(std[1:] / std[:-1]) < 1.1
    ratios.append(std[-1] / std[0])
  assert 0.5 < math.exp(np.mean(np.log(ratios))) < 2.0


def test_residual_blocks_double_the_variance_without_bn():
  """x + W relu(x): Var(W relu(x)) = 2 * Var(x) / 2 = Var(x), so the std grows sqrt(2)x a block."""
  std = scales_at_init(residual=True)['activation_std']
  growth = std[1:] / std[:-1]
  assert 1.3 < np.median(growth) < 1.5
  assert 1.3 < (std[-1] / std[0]) ** (1 / (DEPTH - 1)) < 1.5
  assert np.all(growth > 1.15)


def test_bn_residual_blocks_add_one_to_the_variance():
  """x + W relu(BN(x)): the branch has variance 2 * 1/2 = 1 whatever Var(x): +1 a block.

  The branch's share of block l shrinks as 1 / (l + 1): deep BN-ResNets start
  close to the identity (De & Smith 2020).
  """
  var = scales_at_init(norm=True, residual=True)['activation_std'] ** 2
  increments = np.diff(var)
  assert 0.85 < increments.mean() < 1.15
  assert np.all((increments > 0.5) & (increments < 1.5))


def test_bn_fixes_each_plain_block_output_and_its_gradients_explode_backwards():
  """relu(BN(z)) is relu of a standard normal: std sqrt(1/2 - 1/(2 pi)) ~ 0.584 at every block.

  Yet the gradients grow going back through the blocks (Yang et al. 2019, "A
  mean field theory of batch normalization"): here |grad|^2 grows ~1.45x a
  block, while a plain net without BN keeps it within ~15 % a block.
  """
  s = scales_at_init(norm=True)
  np.testing.assert_allclose(s['activation_std'], math.sqrt(0.5 - 0.5 / math.pi), rtol=0.05)
  g = s['grad_norm']
  chex.assert_tree_all_finite(g)
  assert 1.3 < (g[0] / g[-1]) ** (2 / (DEPTH - 1)) < 1.6
  g = scales_at_init()['grad_norm']
  assert 0.7 < (g[0] / g[-1]) ** (2 / (DEPTH - 1)) < 1.2


def test_init_scales_survive_activations_whose_squares_overflow():
  """A residual net without BN reaches std ~1e19 at 128 blocks: (1e19)^2 overflows float32."""
  std = scales_at_init(depth=128, width=32, residual=True)['activation_std']
  assert np.all(np.isfinite(std)) and std[-1] > 1e15


# --- the experiment -------------------------------------------------------------------------


def run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
    [sys.executable, 'experiments/depth.py', *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result


@pytest.mark.slow  # a process that trains 8 models
def test_quick_mode_writes_results_table_and_figure(tmp_path):
  result = run('--quick', '--out', str(tmp_path))
  results = json.loads((tmp_path / 'results.json').read_text())
  assert results['provenance']['commit'] and results['provenance']['cpu']['model_name']
  settings = results['settings']
  assert settings['depths'] == [2] and settings['train_examples'] == 2048
  assert len(results['runs']) == 4  # the variants, one depth, seed and lr
  assert all(len(r['epochs']) == 1 or r['diverged'] for r in results['runs'])
  for depth in ('2',):
    assert set(results['summary'][depth]) == set(VARIANTS)
    assert len(results['scales'][depth]['residual+bn']['grad_norm']) == int(depth)
  table = (tmp_path / 'table.md').read_text()
  assert table.startswith('Measured at commit ')
  rows = [line for line in table.splitlines() if line.startswith('| ')]
  assert [r.split(' | ')[0][2:] for r in rows[1:]] == list(VARIANTS)  # header, 4 variants
  assert table.strip() in result.stdout
  assert (tmp_path / 'depth.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


@pytest.mark.slow  # a process that imports JAX
def test_help_says_what_it_measures():
  out = run('--help').stdout
  assert 'residual+bn' in out and '--quick' in out and '--lrs' in out
