"""Two processes on 127.0.0.1 (jax.distributed, gloo CPU collectives) train as one.

Each process is this file run as a script (``python tests/test_distributed.py
PROCESS_ID PORT OUT``) with 1 or 2 host CPU devices of its own. The processes
are killed if one fails or the time runs out.
"""

import functools
import os
import pathlib
import re
import socket
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from configs import lenet_bn
from d2l_lenet import parallel, settings, steps

pytestmark = pytest.mark.slow  # spawns processes

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
GLOBAL_BATCH = 16
# The last step's padded batch: the first process holds 8 real examples, the
# second 3 (with 2 devices each: 4, 4, 3 and 0 per device).
LAST_MASK = np.arange(GLOBAL_BATCH) < 11
TIMEOUT = 240


def batches():
  """Three global batches, the same in every process; the last one padded."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(3):
    mask = LAST_MASK if i == 2 else np.ones(GLOBAL_BATCH, bool)
    image = rng.uniform(size=(GLOBAL_BATCH, 28, 28, 1)).astype(np.float32)
    image[~mask] = 100.0
    label = rng.integers(0, 10, GLOBAL_BATCH).astype(np.int32)
    out.append({'image': image, 'label': label, 'mask': mask})
  return out


@functools.cache
def reference():
  """Params, batch_stats and metrics after the steps on one device, real examples only."""
  config = lenet_bn.get_config()
  model = settings.build_model(config)
  state = steps.create_train_state(jax.random.key(0), model, config.learning_rate)
  step = jax.jit(steps.train_step)
  metrics = []
  for batch in batches():
    real = batch['mask']
    state, m = step(state, {'image': batch['image'][real], 'label': batch['label'][real]})
    metrics.append(m)
  return jax.tree.leaves(jax.device_get((state.params, state.batch_stats, metrics)))


def worker(process_id: int, port: int, out: str) -> None:
  """One process of the run: three `parallel.make_train_step` steps; saves the results."""
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  distributed = ml_collections.ConfigDict(
    {'coordinator_address': f'127.0.0.1:{port}', 'num_processes': 2, 'process_id': process_id}
  )
  parallel.initialize_distributed(distributed)
  assert jax.process_count() == NUM_PROCESSES and jax.process_index() == process_id
  mesh = parallel.make_mesh()
  config = lenet_bn.get_config()
  config.batch_size = GLOBAL_BATCH
  settings.validate_config(config, mesh.size, masked=True)
  model = settings.build_model(config, parallel.bn_axis_name(mesh, config.bn.stats))
  state = steps.create_train_state(jax.random.key(0), model, config.learning_rate)
  step = parallel.make_train_step(mesh, config.bn.stats)
  state = parallel.replicate(mesh, state)
  metrics = []
  for batch in batches():
    state, m = step(state, parallel.shard(mesh, batch))
    metrics.append(m)
  results = jax.device_get((state.params, state.batch_stats, metrics))
  np.savez(out, jax.device_count(), *jax.tree.leaves(results))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_processes(commands, env, logs, timeout=TIMEOUT):
  """Runs ``commands`` together; kills them all when one fails or time runs out."""
  procs = []
  try:
    for command, log in zip(commands, logs, strict=True):
      with open(log, 'w') as f:
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=f))
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
      failed = any(p.returncode not in (None, 0) for p in procs)
      if failed or time.monotonic() > deadline:
        break
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  outputs = [pathlib.Path(log).read_text() for log in logs]
  for p, output in zip(procs, outputs, strict=True):
    assert p.returncode == 0, f'a process ended with {p.returncode}:\n{output[-4000:]}'
  return outputs


def env_with(local_devices: int) -> dict[str, str]:
  return dict(
    os.environ,
    JAX_PLATFORMS='cpu',
    XLA_FLAGS=f'--xla_force_host_platform_device_count={local_devices}',
    PYTHONPATH=str(ROOT),
  )


@pytest.mark.parametrize('local_devices', [1, 2])
def test_two_processes_take_the_steps_of_one(tmp_path, local_devices):
  """3 LeNet steps on 2 processes x local_devices = 3 steps on one device, whole batches."""
  port = free_port()
  outs = [tmp_path / f'{i}.npz' for i in range(NUM_PROCESSES)]
  run_processes(
    [[sys.executable, __file__, str(i), str(port), str(outs[i])] for i in range(NUM_PROCESSES)],
    env_with(local_devices),
    [tmp_path / f'{i}.log' for i in range(NUM_PROCESSES)],
  )
  want = reference()
  for out in outs:
    with np.load(out) as saved:
      num_devices, *got = (saved[f'arr_{i}'] for i in range(len(saved.files)))
    assert num_devices == NUM_PROCESSES * local_devices
    for g, w in zip(got, want, strict=True):
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_train_py_runs_on_two_processes_as_on_one(tmp_path):
  """train.py, started from config on 2 processes of 2 devices, learns as one process does."""
  flags = [
    '--config=configs/lenet_bn.py',
    '--config.num_epochs=1',
    '--config.batch_size=64',
    '--config.data.num_train=1024',
    '--config.data.num_test=500',
    '--config.progress_bar=False',
    # At the chapter's 1.0, 16 steps amplify the rounding of the other order
    # of the sums across devices into a few examples of train acc; at 0.1
    # the two runs stay within rounding (test_two_processes_take_the_steps_of_one
    # checks the steps themselves at 1.0).
    '--config.learning_rate=0.1',
  ]
  train = [sys.executable, str(ROOT / 'train.py'), *flags]
  port = free_port()
  distributed = [
    [
      *train,
      f'--workdir={tmp_path / "two"}',
      f'--config.distributed.coordinator_address=127.0.0.1:{port}',
      f'--config.distributed.num_processes={NUM_PROCESSES}',
      f'--config.distributed.process_id={i}',
    ]
    for i in range(NUM_PROCESSES)
  ]
  logs = [tmp_path / f'{i}.log' for i in range(NUM_PROCESSES)]
  outputs = run_processes(distributed, env_with(2), logs)
  (single,) = run_processes(
    [[*train, f'--workdir={tmp_path / "one"}']], env_with(1), [tmp_path / 'one.log']
  )

  final = re.compile(r'loss (\S+), train acc (\S+), test acc (\S+)')
  for output in outputs:
    assert '4 cpu devices in 2 processes' in output
    assert final.search(output).groups() == final.search(outputs[0]).groups()
  np.testing.assert_allclose(
    np.array(final.search(outputs[0]).groups(), float),
    np.array(final.search(single).groups(), float),
    atol=2e-3,
  )
  assert len((tmp_path / 'two' / 'metrics.jsonl').read_text().splitlines()) == 1
  assert (tmp_path / 'two' / 'checkpoints' / '1').is_dir()
  assert 'distributed' not in (tmp_path / 'two' / 'config.json').read_text()


if __name__ == '__main__':
  worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
