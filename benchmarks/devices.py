r"""Train-step throughput of data-parallel LeNet-BN on 1, 2, 4 and 8 host CPU devices.

  python benchmarks/devices.py [--devices 1 2 4 8] [--batch_size 256] [--steps 40] \
      [--out results/devices]

Each device count runs in its own process (XLA_FLAGS must set the number of
host devices before JAX starts) and times the trainer's step,
`d2l_lenet.parallel.make_train_steps`, one step per dispatch as the trainer runs
it, on synthetic images, for global and per-device BN statistics. The global
batch is the same for every count, so each device gets batch_size / devices.

The host devices share this machine's CPU cores, so the table measures the
cost of sharding and collectives, not scaling (which needs devices with their
own compute: GPUs, TPUs or hosts). Other work on the machine shows up as noise.
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODES = ('global', 'per_device')


def measure(batch_size: int, num_steps: int, repeats: int) -> dict[str, float]:
  """Examples/s of each BN mode on this process's devices (best of ``repeats``)."""
  import jax
  import numpy as np

  from configs import lenet_bn
  from d2l_lenet import parallel, settings, steps

  mesh = parallel.make_mesh()
  rng = np.random.default_rng(0)
  num_examples = batch_size * num_steps
  images, labels = parallel.replicate(
    mesh,
    (
      rng.uniform(size=(num_examples, 28, 28, 1)).astype(np.float32),
      rng.integers(0, 10, num_examples).astype(np.int32),
    ),
  )
  indices = parallel.replicate(mesh, np.arange(num_examples, dtype=np.int32))
  indices = [indices[i * batch_size : (i + 1) * batch_size][None] for i in range(num_steps)]
  runs = {}
  for mode in MODES:
    config = lenet_bn.get_config()
    model = settings.build_model(config, parallel.bn_axis_name(mesh, mode))
    state = steps.create_train_state(jax.random.key(0), model, config.learning_rate)
    state = parallel.replicate(mesh, state)
    train_steps = parallel.make_train_steps(mesh, mode)
    state, _ = train_steps(state, images, labels, indices[0])  # compiles
    runs[mode] = [train_steps, jax.block_until_ready(state)]

  best = dict.fromkeys(MODES, float('inf'))
  for _ in range(repeats):  # the modes take turns, so that load changes hit both
    for mode, (train_steps, state) in runs.items():
      start = time.perf_counter()
      metrics = None
      for idx in indices:
        # As the trainer does: step i is queued before step i - 1's metrics are
        # read. (Queueing all steps at once can stall XLA:CPU's collectives.)
        state, new_metrics = train_steps(state, images, labels, idx)
        jax.device_get(metrics)
        metrics = new_metrics
      jax.block_until_ready((state, metrics))
      best[mode] = min(best[mode], time.perf_counter() - start)
      runs[mode][1] = state
  return {mode: num_examples / seconds for mode, seconds in best.items()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--devices', type=int, nargs='+', default=[1, 2, 4, 8])
  parser.add_argument('--batch_size', type=int, default=256, help='global batch (default 256)')
  parser.add_argument('--steps', type=int, default=40, help='timed steps per repeat')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument(
    '--out', type=pathlib.Path, help='write results.json (with provenance) and table.md here'
  )
  parser.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(measure(args.batch_size, args.steps, args.repeats)))
    return
  rows = []

  print(f'LeNet-BN train step, global batch {args.batch_size}, on {os.cpu_count()} CPU cores')
  print(f'{"devices":>7}  {"per device":>10}  {"global BN":>14}  {"per-device BN":>14}')
  for n in args.devices:
    if args.batch_size % n:
      sys.exit(f'--batch_size={args.batch_size} is not divisible by {n} devices.')
    env = dict(
      os.environ,
      JAX_PLATFORMS='cpu',
      XLA_FLAGS=f'--xla_force_host_platform_device_count={n}',
      PYTHONPATH=str(ROOT),
    )
    command = [sys.executable, __file__, '--worker', *sys.argv[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode:
      sys.exit(f'{n} devices failed:\n{result.stderr[-3000:]}')
    rates = json.loads(result.stdout.strip().splitlines()[-1])
    rows.append({'devices': n, 'per_device_batch': args.batch_size // n, **rates})
    print(
      f'{n:>7}  {args.batch_size // n:>10}  {rates["global"]:>10,.0f} ex/s'
      f'  {rates["per_device"]:>10,.0f} ex/s',
      flush=True,
    )
  print(
    f'All host devices share the same {os.cpu_count()} cores: this is the cost of sharding '
    'and collectives, not multi-device scaling.'
  )
  if args.out:
    write(args.out, rows)


def write(out: pathlib.Path, rows: list[dict]) -> None:
  """results.json (rows and provenance) and table.md (the README's table) in ``out``."""
  sys.path.insert(0, str(ROOT))
  from d2l_lenet import provenance

  record = provenance.record()
  out.mkdir(parents=True, exist_ok=True)
  (out / 'results.json').write_text(json.dumps({'provenance': record, 'rows': rows}, indent=1))
  lines = [
    f'Measured at commit {record["commit"][:12]} on {record["cpu_description"]}.',
    '',
    '| devices | examples per device | global BN, examples/s | per-device BN, examples/s |',
    '|---|---|---|---|',
  ]
  lines += [
    f'| {r["devices"]} | {r["per_device_batch"]} | {r["global"]:,.0f} | {r["per_device"]:,.0f} |'
    for r in rows
  ]
  (out / 'table.md').write_text('\n'.join(lines) + '\n')


if __name__ == '__main__':
  main()
