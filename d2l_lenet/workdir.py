"""What a run leaves in its workdir: config, metrics, checkpoints and a plot.

::

  workdir/
    config.json       the resolved config (a rerun must match it)
    metrics.jsonl     one JSON record per epoch
    curves.png        loss, train acc and test acc per epoch, as D2L plots them
    checkpoints/N/    orbax checkpoint after epoch N (params, batch_stats,
                      optimizer state, step), the last few kept
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
import time
from typing import Any

import ml_collections

from d2l_lenet import files

# Fields that do not change what a run computes: a run may resume with
# other values of these (e.g. more epochs).
RESUMABLE_FIELDS = ('num_epochs', 'progress_bar', 'steps_per_dispatch', 'eval_batch_size')


class WorkdirError(RuntimeError):
  """The workdir cannot be used for this run; the message says why and what to do."""


def prepare(
  workdir: str | os.PathLike, config: ml_collections.ConfigDict, write: bool = True
) -> pathlib.Path:
  """Creates ``workdir`` (or checks it is writable) and records ``config`` there.

  Every process checks; with several processes only the one with ``write``
  (process 0) writes ``config.json``.

  Raises:
    WorkdirError: if the directory cannot be written, or holds a run of a
      different config (differences other than `RESUMABLE_FIELDS`).
  """
  path = pathlib.Path(workdir).expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    raise WorkdirError(
      f'Cannot write to workdir {path} ({e.strerror or e}): choose another --workdir.'
    ) from e
  new = json.loads(config.to_json_best_effort())
  config_file = path / 'config.json'
  if config_file.exists():
    # Nested fields by their dotted names (bn.momentum), as --config.FIELD names them.
    old, new_fields = _flatten(json.loads(config_file.read_text())), _flatten(new)
    changed = {
      k: (old.get(k), new_fields.get(k))
      for k in sorted(set(old) | set(new_fields))
      if k not in RESUMABLE_FIELDS and old.get(k) != new_fields.get(k)
    }
    if changed:
      diff = ', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changed.items())
      raise WorkdirError(
        f'{path} holds a run of another config ({diff}). Refusing to mix them: '
        'pass a new --workdir, or the same config to resume that run.'
      )
  if write:
    write_text(config_file, json.dumps(new, indent=2, sort_keys=True) + '\n')
  return path


def _flatten(tree: dict[str, Any], prefix: str = '') -> dict[str, Any]:
  """``{'bn': {'momentum': 0.9}}`` as ``{'bn.momentum': 0.9}``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def write_text(path: pathlib.Path, text: str) -> None:
  """Writes ``text`` atomically: readers see the old file or the new, never half."""
  with files.atomic_file(path, 'w') as f:
    f.write(text)


def read_metrics(workdir: pathlib.Path) -> list[dict[str, Any]]:
  """The per-epoch records of ``metrics.jsonl`` (empty if there is none)."""
  path = workdir / 'metrics.jsonl'
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_metrics(workdir: pathlib.Path, records: list[dict[str, Any]]) -> None:
  """Rewrites ``metrics.jsonl`` with ``records``, one JSON object per line."""
  write_text(workdir / 'metrics.jsonl', ''.join(json.dumps(r) + '\n' for r in records))


def plot_curves(workdir: pathlib.Path, records: list[dict[str, Any]], title: str) -> pathlib.Path:
  """Draws loss, train acc and test acc per epoch into ``curves.png``."""
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  epochs = [r['epoch'] for r in records]
  fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
  for key, label, style in (
    ('train_loss', 'train loss', '-'),
    ('train_accuracy', 'train acc', '--'),
    ('test_accuracy', 'test acc', '-.'),
  ):
    ax.plot(epochs, [r[key] for r in records], style, label=label)
  if 'test_accuracy_running' in records[-1]:
    running = [r.get('test_accuracy_running') for r in records]
    ax.plot(epochs, running, ':', label='test acc (running averages)')
  ax.set_xlabel('epoch')
  ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
  ax.set_xlim(0.5, max(epochs) + 0.5)
  ax.set_ylim(0, max(1.0, *(r['train_loss'] for r in records)))
  ax.grid(True, alpha=0.3)
  ax.legend()
  ax.set_title(title, fontsize=9)
  fig.tight_layout()
  path = workdir / 'curves.png'
  with files.atomic_file(path) as f:
    fig.savefig(f, format='png')
  plt.close(fig)
  return path


class Checkpoints:
  """Orbax checkpoints of the train state, one per epoch, written atomically.

  Orbax writes each checkpoint into a temporary directory and renames it
  when complete, so a run killed mid-write leaves the previous one intact.
  """

  def __init__(self, workdir: pathlib.Path, max_to_keep: int = 2):
    import orbax.checkpoint as ocp

    self._ocp = ocp
    self.directory = (workdir / 'checkpoints').absolute()
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=self._options)

  def save(self, epoch: int, state: Any) -> None:
    """Saves ``state`` (any pytree) as the checkpoint of ``epoch`` and waits for it."""
    from flax import serialization

    tree = serialization.to_state_dict(state)
    self._manager.save(epoch, args=self._ocp.args.StandardSave(tree))
    self._manager.wait_until_finished()

  def restore_latest(self, template: Any) -> tuple[int, Any, list[str]]:
    """The newest readable checkpoint as ``(epoch, state)``, or ``(0, template)``.

    A checkpoint that cannot be read is skipped for the one before it; the
    third value lists what was skipped and why.
    """
    import jax
    from flax import serialization

    target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(jax.numpy.shape(x), jax.numpy.result_type(x)),
      serialization.to_state_dict(template),
    )
    skipped = []
    for epoch in sorted(self._manager.all_steps(), reverse=True):
      try:
        tree = self._manager.restore(epoch, args=self._ocp.args.StandardRestore(target))
      except Exception as e:  # orbax raises many kinds; all mean unreadable
        # Moved aside (by process 0 alone), not deleted: the next save of this
        # epoch needs the name.
        aside = 'by process 0'
        if jax.process_index() == 0:
          path = self.directory / f'{epoch}.unreadable-{time.strftime("%Y%m%d-%H%M%S")}'
          (self.directory / str(epoch)).rename(path)
          aside = f'to {path}'
        skipped.append(
          f'checkpoint of epoch {epoch} ({type(e).__name__}: {str(e)[:200]}); moved {aside}'
        )
        continue
      self._forget(skipped)
      return epoch, serialization.from_state_dict(template, tree), skipped
    self._forget(skipped)
    return 0, template, skipped

  def _forget(self, skipped: list[str]) -> None:
    """A new manager, so that checkpoints moved aside are forgotten (only if any were)."""
    if skipped:
      import jax
      from jax.experimental import multihost_utils

      if jax.process_count() > 1:  # process 0 has moved them
        multihost_utils.sync_global_devices('jaxbn: unreadable checkpoints moved aside')
      self._manager.close()
      self._manager = self._ocp.CheckpointManager(self.directory, options=self._options)

  def close(self) -> None:
    self._manager.close()
