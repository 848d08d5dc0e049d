"""`train_and_evaluate(config, workdir)`: the whole run, as `train.py` starts it.

`_setup` checks the config and prepares everything the epochs use (mesh,
workdir, data, model, state restored from the last checkpoint, compiled
functions); each epoch is `_train_epoch` then `_evaluate`, recorded by
`_record`; `_summarize` prints the chapter's closing lines.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from d2l_lenet import data as data_lib
from d2l_lenet import models, parallel, settings, steps
from d2l_lenet import workdir as workdir_lib

Record = dict[str, Any]


@dataclasses.dataclass
class _Run:
  """What `_setup` prepares for the epochs; fixed for the whole run."""

  config: ml_collections.ConfigDict
  workdir: pathlib.Path
  device: str  # the mesh, in words
  checkpoints: workdir_lib.Checkpoints
  train_images: jax.Array  # replicated
  train_labels: jax.Array
  test_batches: tuple[jax.Array, ...]  # `steps.pad_and_batch`'s, sharded
  shuffle_rng: jax.Array
  steps_per_epoch: int
  chunk: int  # steps per dispatch
  shuffle: Any  # jitted `steps.shuffled_batches`
  # Set by `_compile`:
  train_chunk: Any = None  # `steps.train_steps` over the mesh, for `chunk` steps
  evaluate: Any = None  # `steps.evaluate` of the test batches
  compile_seconds: float = 0.0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> dict:
  """Trains and evaluates ``config`` for ``config.num_epochs``, writing into ``workdir``.

  Resumes from the newest checkpoint in ``workdir`` if there is one. Prints
  one line per epoch and the chapter's summary at the end.

  Returns:
    A dict with the final ``state``, the per-epoch ``records`` and the
    summary figures (``train_loss``, ``train_accuracy``, ``test_accuracy``,
    ``examples_per_sec``, ``compile_seconds``).

  Raises:
    settings.ConfigError, data.DataNotFoundError, workdir.WorkdirError: bad input.
    FloatingPointError: the loss or the parameters stopped being finite;
      the last good checkpoint and metrics are kept.
  """
  run, state, start_epoch = _setup(config, workdir)
  records = workdir_lib.read_metrics(run.workdir)[:start_epoch]
  for epoch in range(start_epoch + 1, config.num_epochs + 1):
    state, train = _train_epoch(run, state, epoch)
    state, test = _evaluate(run, state)
    records.append({'epoch': epoch, **train, **test})
    _record(run, state, records)
  run.checkpoints.close()
  return _summarize(run, state, records)


def _setup(config, workdir) -> tuple[_Run, steps.TrainState, int]:
  """The run's mesh, workdir, data, model, compiled steps, and the state to start from."""
  # Every field before anything starts: a bad value leaves no process group,
  # workdir, loaded data or compiled step behind.
  settings.validate_fields(config)
  parallel.initialize_distributed(config.distributed)
  mesh = parallel.make_mesh()
  settings.validate_config(config, num_devices=mesh.size)
  # The start-up settings (process_id differs between processes) are not part of the run.
  run_config = ml_collections.ConfigDict({k: v for k, v in config.items() if k != 'distributed'})
  workdir = workdir_lib.prepare(workdir, run_config, write=jax.process_index() == 0)
  dataset = data_lib.load_fashion_mnist(
    config.data.data_dir or None, config.data.idx_dir or None, config.data.download
  ).subset(config.data.num_train, config.data.num_test)
  num_train = len(dataset.train_labels)
  print(f'data: {num_train} train / {len(dataset.test_labels)} test examples from {dataset.source}')

  model = settings.build_model(config, parallel.bn_axis_name(mesh, config.bn.stats))
  init_rng, shuffle_rng = jax.random.split(jax.random.key(config.seed))
  state = steps.create_train_state(init_rng, model, config.learning_rate)
  checkpoints = workdir_lib.Checkpoints(workdir)
  start_epoch, state, skipped = checkpoints.restore_latest(state)
  for reason in skipped:
    print(f'skipped unreadable {reason}')
  if start_epoch:
    print(f'resuming {workdir} after epoch {start_epoch}')

  state, train_images, train_labels = parallel.replicate(
    mesh, (state, dataset.train_images, dataset.train_labels)
  )
  test_batches = steps.pad_and_batch(
    dataset.test_images, dataset.test_labels, config.eval_batch_size, num_shards=mesh.size
  )
  steps_per_epoch = num_train // config.batch_size
  run = _Run(
    config=config,
    workdir=workdir,
    device=parallel.describe(mesh),
    checkpoints=checkpoints,
    train_images=train_images,
    train_labels=train_labels,
    test_batches=parallel.shard(mesh, test_batches, axis=1),
    shuffle_rng=shuffle_rng,
    steps_per_epoch=steps_per_epoch,
    chunk=steps.steps_per_dispatch(steps_per_epoch, config.steps_per_dispatch),
    shuffle=jax.jit(
      steps.shuffled_batches, static_argnums=(1, 2), out_shardings=parallel.replicated(mesh)
    ),
  )
  _compile(run, mesh, state)
  print(
    f'compiled in {run.compile_seconds:.1f} s on {run.device}; {steps_per_epoch} steps per epoch'
  )
  return run, state, start_epoch


def _compile(run: _Run, mesh: jax.sharding.Mesh, state: steps.TrainState) -> None:
  """Compiles the run's train chunk and evaluation before the first epoch, timed."""
  start = time.perf_counter()
  indices = jax.ShapeDtypeStruct(
    (run.chunk, run.config.batch_size), jnp.int32, sharding=parallel.replicated(mesh)
  )
  run.train_chunk = (
    parallel.make_train_steps(mesh, run.config.bn.stats)
    .lower(state, run.train_images, run.train_labels, indices)
    .compile()
  )
  run.evaluate = jax.jit(steps.evaluate).lower(state, *run.test_batches).compile()
  run.compile_seconds = time.perf_counter() - start


def _train_epoch(run: _Run, state: steps.TrainState, epoch: int) -> tuple[steps.TrainState, Record]:
  """One epoch of full shuffled batches; returns the state and the epoch's training figures."""
  config = run.config
  batches = run.shuffle(
    jax.random.fold_in(run.shuffle_rng, epoch), len(run.train_labels), config.batch_size
  )
  batches = batches.reshape(-1, run.chunk, config.batch_size)
  meter = _EpochMeter(epoch, config, run.steps_per_epoch, run.workdir)
  start = time.perf_counter()
  # Chunk c + 1 is queued before chunk c's metrics are read, so the device
  # never waits for the host.
  pending = None
  for c in range(len(batches)):
    state, metrics = run.train_chunk(state, run.train_images, run.train_labels, batches[c])
    if pending is not None:
      meter.add(*pending)
    pending = (metrics, c * run.chunk)
  meter.add(*pending)
  seconds = time.perf_counter() - start
  meter.bar.close()
  if not bool(_all_finite(state.params)):
    raise FloatingPointError(
      f'The parameters stopped being finite in epoch {epoch} (they are checked after its '
      f'last step, step {int(state.step)} of the run). Stopped; '
      f'{_kept(epoch, run.workdir)} {_likely_causes(config)}'
    )
  examples = run.steps_per_epoch * config.batch_size
  return state, {
    'train_loss': meter.mean('loss'),
    'train_accuracy': meter.mean('accuracy'),
    'train_examples': examples,
    'train_seconds': seconds,
    'examples_per_sec': examples / seconds,
  }


def _evaluate(run: _Run, state: steps.TrainState) -> tuple[steps.TrainState, Record]:
  """Test loss and accuracy, with precise BN statistics if ``config.bn.precise_examples``.

  Precise statistics replace the running averages in the returned state;
  the accuracy with the running averages is then ``test_accuracy_running``.
  """
  start = time.perf_counter()
  record = {}
  if run.config.bn.precise_examples:
    record['test_accuracy_running'] = float(run.evaluate(state, *run.test_batches)['accuracy'])
    # On whole batches outside shard_map: the model without the mesh's axis name.
    batch_stats = steps.precise_batch_stats(
      settings.build_model(run.config),
      state.params,
      state.batch_stats,
      run.train_images[: run.config.bn.precise_examples],
      run.config.batch_size,
    )
    state = state.replace(batch_stats=batch_stats)
  test = jax.device_get(run.evaluate(state, *run.test_batches))
  record.update(test_loss=float(test['loss']), test_accuracy=float(test['accuracy']))
  record['eval_seconds'] = time.perf_counter() - start
  return state, record


def _record(run: _Run, state: steps.TrainState, records: list[Record]) -> None:
  """Saves the checkpoint, metrics and curves of the last epoch, and prints its line."""
  config, record = run.config, records[-1]
  run.checkpoints.save(record['epoch'], state)
  if jax.process_index() == 0:  # orbax coordinates the processes' checkpoints itself
    workdir_lib.write_metrics(run.workdir, records)
    workdir_lib.plot_curves(
      run.workdir, records, f'LeNet ({config.api}), norm={config.norm}, lr={config.learning_rate}'
    )
  print(
    f'epoch {record["epoch"]:>{len(str(config.num_epochs))}}/{config.num_epochs}  '
    f'loss {record["train_loss"]:.3f}  train acc {record["train_accuracy"]:.3f}  '
    f'test acc {record["test_accuracy"]:.3f}  {record["examples_per_sec"]:,.0f} examples/s',
    flush=True,
  )


@jax.jit
def _all_finite(tree) -> jax.Array:
  """Whether every entry of every array in ``tree`` is finite, in one compiled call."""
  return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def _kept(epoch: int, workdir: pathlib.Path) -> str:
  """What a run stopped in ``epoch`` leaves behind."""
  if epoch == 1:
    return f'no epoch had finished, so {workdir} holds no checkpoint yet.'
  return f'the checkpoint and metrics of epoch {epoch - 1} in {workdir} are kept.'


def _likely_causes(config: ml_collections.ConfigDict) -> str:
  """Why training stops being finite, most common first, each with its field's value."""
  causes = [
    f'a learning rate too high for this model (config.learning_rate={config.learning_rate})'
  ]
  if config.norm != 'none':
    causes.append(
      'a BN epsilon too small to keep the normalisation of a nearly constant channel '
      f'finite in float32 (config.bn.epsilon={config.bn.epsilon})'
    )
  causes.append(
    'or input data that is not Fashion-MNIST as d2l_lenet.data loads it '
    f'(config.data.data_dir={config.data.data_dir!r}, idx_dir={config.data.idx_dir!r})'
  )
  return f'Likely causes: {"; ".join(causes)}.'


class _EpochMeter:
  """Adds up an epoch's step metrics, drives its progress bar, stops on a non-finite loss."""

  def __init__(self, epoch, config, steps_per_epoch, workdir):
    self.epoch, self.config = epoch, config
    self.steps_per_epoch, self.workdir = steps_per_epoch, workdir
    self.sums = {'loss': 0.0, 'accuracy': 0.0}
    self.steps = 0
    self.bar = tqdm.tqdm(
      total=steps_per_epoch,
      desc=f'epoch {epoch}/{config.num_epochs}',
      unit='step',
      leave=False,
      disable=None if config.progress_bar else True,  # None: only on a terminal
    )

  def add(self, metrics: dict[str, jax.Array], first_step: int) -> None:
    """Takes the (S,) metrics of the steps from ``first_step`` (0-based) on."""
    metrics = jax.device_get(metrics)
    bad = np.flatnonzero(~np.isfinite(metrics['loss']))
    if bad.size:
      self.bar.close()
      raise FloatingPointError(
        f'The loss became {metrics["loss"][bad[0]]} at epoch {self.epoch}, step '
        f'{first_step + bad[0] + 1} of {self.steps_per_epoch}. Stopped; '
        f'{_kept(self.epoch, self.workdir)} {_likely_causes(self.config)}'
      )
    for key in self.sums:
      self.sums[key] += float(metrics[key].sum())
    self.steps += len(metrics['loss'])
    self.bar.update(len(metrics['loss']))
    self.bar.set_postfix(loss=f'{self.mean("loss"):.3f}', acc=f'{self.mean("accuracy"):.3f}')

  def mean(self, key: str) -> float:
    return self.sums[key] / max(self.steps, 1)


def _summarize(run: _Run, state: steps.TrainState, records: list[Record]) -> dict[str, Any]:
  """Prints the chapter's closing lines and where the outputs are."""
  last = records[-1]
  seconds = sum(r['train_seconds'] for r in records)
  summary = {
    'state': state,
    'records': records,
    **{key: last[key] for key in ('train_loss', 'train_accuracy', 'test_accuracy')},
    'examples_per_sec': sum(r['train_examples'] for r in records) / seconds,
    'compile_seconds': run.compile_seconds,
  }
  print(
    f'loss {last["train_loss"]:.3f}, train acc {last["train_accuracy"]:.3f}, '
    f'test acc {last["test_accuracy"]:.3f}'
  )
  print(f'{summary["examples_per_sec"]:.1f} examples/sec on {run.device}')
  first_bn = models.first_norm_params(state.params)
  if first_bn is not None:
    with np.printoptions(precision=4, suppress=True):
      for name, value in first_bn.items():
        print(f'first BN layer {name}: {np.asarray(value)}')
  accuracies = [r['test_accuracy'] for r in records]
  print(
    f'test acc over epochs {records[0]["epoch"]}-{last["epoch"]}: '
    f'{min(accuracies):.3f} - {max(accuracies):.3f}'
  )
  print(
    f'outputs in {run.workdir}: config.json, metrics.jsonl, curves.png, '
    f'checkpoints/ ({math.ceil(seconds)} s of training)'
  )
  return summary
