"""The chapter's LeNet in Flax NNX: the linen model's twin, trained by the same steps."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import lenet_bn_nnx
from d2l_lenet import data, models, nnx_apply, settings, steps, trainer
from jaxbn import precise


def fake_batch(n=32, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  return {
    'image': jax.random.uniform(k1, (n, 28, 28, 1)),
    'label': jax.random.randint(k2, (n,), 0, 10),
  }


@pytest.mark.parametrize(
  'norm, conv_impl',
  [('jaxbn', 'banded'), ('flax', 'banded'), ('none', 'banded'), ('jaxbn', 'standard')],
)
def test_nnx_and_linen_lenets_given_the_same_weights_take_the_same_steps(norm, conv_impl):
  linen = models.LeNet(norm=models.norm_layer(norm, momentum=0.9), conv_impl=conv_impl)
  make_nnx = functools.partial(
    models.NNXLeNet, models.norm_layer(norm, 'nnx', momentum=0.9), conv_impl=conv_impl
  )
  states = [steps.create_train_state(jax.random.key(0), m, 1.0) for m in (linen, make_nnx)]
  # The same variables: names, shapes and dtypes.
  chex.assert_trees_all_equal_shapes_and_dtypes(
    (states[0].params, states[0].batch_stats), (states[1].params, states[1].batch_stats)
  )
  states[1] = states[1].replace(params=states[0].params, batch_stats=states[0].batch_stats)
  step = jax.jit(steps.train_step)
  for i in range(2):
    (states[0], got), (states[1], want) = (step(s, fake_batch(seed=i)) for s in states)
    chex.assert_trees_all_close(got, want, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(
    (states[0].params, states[0].batch_stats),
    (states[1].params, states[1].batch_stats),
    rtol=1e-6,
    atol=1e-6,
  )
  if norm != 'none':
    assert not np.allclose(states[1].batch_stats['bn1']['mean'], 0.0)


def test_as_apply_trains_or_infers_and_leaves_its_model_alone():
  model = models.NNXLeNet(rngs=nnx.Rngs(0))
  apply_fn, variables = nnx_apply.as_apply(model)
  x = fake_batch(8)['image']
  logits, updates = jax.jit(functools.partial(apply_fn, train=True, mutable=['batch_stats']))(
    variables, x
  )
  chex.assert_shape(logits, (8, 10))
  moved = jax.tree.map(
    lambda a, b: bool(jnp.any(a != b)), updates['batch_stats'], variables['batch_stats']
  )
  assert all(jax.tree.leaves(moved))
  # Inference uses the running averages: the model in eval mode gives the same logits.
  model.eval()
  chex.assert_trees_all_close(apply_fn(variables, x, train=False), model(x), rtol=1e-6)
  # The NNX model's own running averages were not touched by apply_fn's calls.
  own = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))
  chex.assert_trees_all_equal(own, variables['batch_stats'])


def test_train_py_config_trains_the_nnx_model(tmp_path):
  config = lenet_bn_nnx.get_config()
  config.update_from_flattened_dict(
    {
      'num_epochs': 2,
      'batch_size': 64,
      'progress_bar': False,
      'data.num_train': 1024,
      'data.num_test': 500,
    }
  )
  assert callable(settings.build_model(config))  # the NNXLeNet's constructor
  result = trainer.train_and_evaluate(config, tmp_path)
  assert [r['epoch'] for r in result['records']] == [1, 2]
  assert result['records'][1]['train_loss'] < result['records'][0]['train_loss']
  assert (tmp_path / 'checkpoints').is_dir() and (tmp_path / 'metrics.jsonl').exists()


def test_trainer_sets_precise_statistics_of_the_nnx_model(tmp_path):
  """The NNX run's statistics after evaluation are linen's precise ones for its weights."""
  config = lenet_bn_nnx.get_config()
  config.update_from_flattened_dict(
    {
      'num_epochs': 1,
      'batch_size': 32,
      'progress_bar': False,
      'data.num_train': 256,
      'data.num_test': 100,
      'bn.precise_examples': 96,
    }
  )
  result = trainer.train_and_evaluate(config, tmp_path)
  assert 'test_accuracy_running' in result['records'][0]
  state = result['state']
  images = data.load_fashion_mnist().subset(256, 100).train_images[:96]
  linen = models.LeNet(norm=models.norm_layer('jaxbn', momentum=config.bn.momentum))
  want = precise.precise_batch_stats(
    linen.apply, state.params, state.batch_stats, jnp.asarray(images), 32, train=True
  )
  chex.assert_trees_all_close(state.batch_stats, want, rtol=1e-5, atol=1e-6)
