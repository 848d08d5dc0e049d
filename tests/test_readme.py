"""The README's examples run and do what they say; its figures and the docs' tables are the
results files'."""

import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'
DOCS = README.parent / 'docs'


def code_cells(page: pathlib.Path) -> list[str]:
  """The code cells of a MyST notebook page of the docs."""
  return re.findall(r'```\{code-cell\} ipython3\n(.*?)```', page.read_text(), re.S)


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


def test_docs_nnx_example_trains_and_evaluates():
  (example,) = [b for b in code_cells(DOCS / 'howto' / 'nnx.md') if 'jnnx.BatchNorm' in b]
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


def test_docs_tables_are_their_results_files():
  """The results page includes each results table (MyST {include}), with its provenance.

  The files are written by the commands the pages cite, each with its
  command, commit and CPU in the results JSON beside it.
  """
  root = README.parent
  page = (DOCS / 'results.md').read_text()
  included = re.findall(r'```\{include\} \.\./(results/\S+)\n```', page)
  assert set(included) == {
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
  for path in included:
    assert (root / path).is_file(), path
    provenance = json.loads((root / path).with_name('results.json').read_text())
    records = provenance.values() if 'provenance' not in provenance else [provenance]
    for record in records:
      assert re.fullmatch(r'[0-9a-f]{40}(\+dirty)?', record['provenance']['commit'])
      assert record['provenance']['cpu']['model_name']


def test_readme_headline_figures_are_in_their_results_files():
  """Each item of the README's Results section names a results file holding its numbers."""
  root = README.parent
  section = re.search(r'\n## Results\n(.*?)\n## ', README.read_text(), re.S).group(1)
  items = re.findall(r'^- (.*?)(?=^- |\Z)', section, re.S | re.M)
  assert len(items) >= 3
  for item in items:
    paths = re.findall(r'`(results/\S+\.md)`', item)
    assert paths, item
    text = ' '.join((root / p).read_text() for p in paths)
    for number in re.findall(r'\d+\.\d+', item):
      assert number in text, f'{number} of the README is not in {paths}'


WHY = {
  'covariate_shift': 'covariate_shift.png',
  'smoothness': 'smoothness.png',
  'depth': 'depth.png',
  'learning_rates': 'learning_rates.png',
  'exercises': 'exercises.png',
}


def test_why_page_shows_each_experiment_with_the_numbers_of_its_table():
  """docs/why.md: each experiment's table and figure; its verdict's numbers are in its table."""
  root = README.parent
  page = (DOCS / 'why.md').read_text()
  sections = re.split(r'\n## ', page)[1:]
  shown = {}
  for section in sections:
    include = re.search(r'```\{include\} \.\./results/why/(\w+)/table\.md\n```', section)
    if not include:
      continue
    name = include.group(1)
    figure = re.search(r'\]\(\.\./results/why/(\w+)/(\S+\.png)\)', section)
    assert figure and figure.groups() == (name, WHY[name]), name
    assert (root / 'results/why' / name / WHY[name]).is_file(), name
    table = (root / 'results/why' / name / 'table.md').read_text()
    results = json.loads((root / 'results/why' / name / 'results.json').read_text())
    assert re.fullmatch(r'[0-9a-f]{40}', results['provenance']['commit']), name
    assert table.startswith(f'Measured at commit {results["provenance"]["commit"][:12]} on ')
    verdict = section[include.end() :]
    assert '**Verdict' in verdict, name
    for number in re.findall(r'\d+\.\d+', verdict):
      assert number in table, f'{number} in the verdict on {name} is not in its table'
    shown[name] = True
  assert set(shown) == set(WHY)
