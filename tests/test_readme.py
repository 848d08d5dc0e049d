"""The README's "use it in your own model" example runs and does what it says."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def test_readme_model_example_trains_and_predicts():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  namespace = {}
  exec(blocks[0], namespace)  # the MLP with jaxbn.BatchNorm, train_step and predict
  x = jax.random.normal(jax.random.key(1), (16, 784))
  y = jnp.arange(16) % 10
  params, stats, opt_state = namespace['params'], namespace['batch_stats'], namespace['opt_state']
  losses = []
  for _ in range(5):
    params, new_stats, opt_state, loss = namespace['train_step'](params, stats, opt_state, x, y)
    losses.append(float(loss))
  assert losses[-1] < losses[0]
  # The running averages moved away from their initial 0 and 1.
  assert not np.allclose(new_stats['BatchNorm_0']['mean'], stats['BatchNorm_0']['mean'])
  logits = namespace['predict'](params, new_stats, x)
  assert logits.shape == (16, 10)


def test_readme_folding_example_gives_the_model_outputs():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  (folding,) = [b for b in blocks if 'jaxbn.folding.fold' in b]
  namespace = {}
  exec(blocks[0], namespace)  # the MLP: Dense -> jaxbn.BatchNorm -> relu -> Dense
  x = jax.random.normal(jax.random.key(1), (16, 784))
  params, stats, opt_state = namespace['params'], namespace['batch_stats'], namespace['opt_state']
  params, stats, _, _ = namespace['train_step'](params, stats, opt_state, x, jnp.arange(16) % 10)
  namespace.update(variables={'params': params, 'batch_stats': stats}, images=x)
  exec(folding, namespace)
  assert 'BatchNorm_0' not in namespace['params']
  want = namespace['predict'](params, stats, x)
  np.testing.assert_allclose(namespace['logits'], want, rtol=1e-5, atol=1e-5)


def test_readme_nnx_example_trains_and_evaluates():
  blocks = re.findall(r'```python\n(.*?)```', README.read_text(), re.S)
  (example,) = [b for b in blocks if 'jnnx.BatchNorm' in b]
  namespace = {}
  exec(example, namespace)
  losses = namespace['losses']
  assert losses[-1] < 0.5 * losses[0]
  assert float(namespace['accuracy']) > 0.9
  model = namespace['model']
  stats = model.bn
  assert not np.allclose(stats.mean[...], 0.0) and not np.allclose(stats.var[...], 1.0)
  h = namespace['x'] @ model.linear1.kernel[...]
  np.testing.assert_allclose(stats.mean[...], h.reshape(2, 32, -1).mean(1).mean(0), atol=1e-5)
  np.testing.assert_allclose(namespace['folded'](namespace['x']), model(namespace['x']), atol=1e-4)
  assert type(namespace['folded'].bn).__name__ == 'FoldedBatchNorm'


def test_readme_tables_are_their_results_files():
  """Each block marked <!-- results/FILE --> ... <!-- end --> is FILE, to the character.

  The files are written by the commands the README cites, each with its
  command, commit and CPU in the results JSON beside it.
  """
  root = README.parent
  blocks = re.findall(r'<!-- (results/\S+) -->\n(.*?)<!-- end -->', README.read_text(), re.S)
  assert {path for path, _ in blocks} == {
    'results/seeds/table.md',
    'results/precise/precise.md',
    'results/claims/learning_rate.md',
    'results/claims/batch_size.md',
    'results/throughput/table.md',
    'results/separate/table.md',
    'results/separate-avx2/table.md',
    'results/separate-avx2-jaxbn/table.md',
    'results/devices/table.md',
    'results/peer/table.md',
  }
  for path, block in blocks:
    assert block == (root / path).read_text(), f'README block differs from {path}'
    provenance = json.loads((root / path).with_name('results.json').read_text())
    records = provenance.values() if 'provenance' not in provenance else [provenance]
    for record in records:
      assert re.fullmatch(r'[0-9a-f]{40}(\+dirty)?', record['provenance']['commit'])
      assert record['provenance']['cpu']['model_name']
