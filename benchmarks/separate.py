r"""Steady-state training rates with each variant in its own process, as a user runs two scripts.

  python benchmarks/separate.py --out results/separate              # about 15 minutes
  python benchmarks/separate.py --isa avx2 --out results/separate-avx2
  python benchmarks/separate.py --passes 1 --rounds 1 --steps 2 --variants 'jaxbn LeNet, norm=jaxbn'

``benchmarks/throughput.py`` times every variant in one process; here each
pass starts one fresh process per variant, in turn (in reverse order every
other pass), with a PyTorch ``nn.BatchNorm`` process before and after each
(`pass_order`). Each process loads the data, compiles or warms up, then
times ``--rounds`` rounds of ``--steps`` steps at batch 256 (JAX as
`d2l_lenet.trainer` dispatches them, PyTorch as ``d2l.train_ch6`` steps, 2
threads) and reports the median. A variant's ratio in a pass is its rate
over the geometric mean of the two ``nn.BatchNorm`` processes around it, so
that a steady drift of the host's speed cancels (not the spread between
processes, which the quartiles show); the table gives the median over
passes and the quartiles. ``torch.compile`` (inductor) is a row of its own,
skipped with the reason when it cannot compile.

``--isa avx2`` runs both frameworks as on a CPU without AVX-512:
``XLA_FLAGS=--xla_cpu_max_isa=AVX2`` (XLA's generated code; its debug
options and the AVX-512 operands left in its object code, by objdump, are
recorded to show that it took effect),
``ATEN_CPU_CAPABILITY=avx2`` (PyTorch's kernels; ``torch.backends.cpu.
get_cpu_capability()`` is recorded) and ``ONEDNN_MAX_CPU_ISA=AVX2`` (PyTorch's
convolutions). Writes ``results.json`` (rates, ratios, per-process ISA checks,
provenance: commit, CPU model and flags, cores, load, versions) and
``table.md``.

Then, as a user compares the two scripts, ``train.py`` and the chapter's
PyTorch loop (``torch_lenet.py``) each train ``--epochs`` epochs in their own
processes, ``--scripts`` times, under the same ISA; their per-epoch training
rates, as each script records them, give one more paired ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import tempfile

import throughput

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2l_lenet import provenance  # noqa: E402

JAX_VARIANTS = {f'jaxbn LeNet, norm={norm}': norm for norm in throughput.JAX_NORMS}
TORCH_VARIANTS = {
  'torch LeNet, D2L BatchNorm': ('scratch', False),
  throughput.REFERENCE: ('nn', False),
  'torch nn.BatchNorm, torch.compile': ('nn', True),
}
VARIANTS = (*JAX_VARIANTS, *TORCH_VARIANTS)
OPTIONAL = ('torch nn.BatchNorm, torch.compile',)  # skipped, not fatal, when they fail
ISAS = ('native', 'avx2')


def isa_environment(isa: str) -> dict[str, str]:
  """The variables that restrict XLA, ATen and oneDNN to ``isa`` (none for 'native')."""
  if isa == 'native':
    return {}
  flags = f'{os.environ.get("XLA_FLAGS", "")} --xla_cpu_max_isa={isa.upper()}'.strip()
  return {'XLA_FLAGS': flags, 'ATEN_CPU_CAPABILITY': isa, 'ONEDNN_MAX_CPU_ISA': isa.upper()}


RESULT = 'RESULT '


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    '--passes',
    type=int,
    default=5,
    help='passes: one process per variant, each between two of nn.BatchNorm',
  )
  parser.add_argument('--rounds', type=int, default=5, help='timed rounds in each process')
  parser.add_argument('--steps', type=int, default=26, help='training steps per round')
  parser.add_argument('--warmup', type=int, default=5, help='untimed steps before the rounds')
  parser.add_argument('--batch-size', type=int, default=256)
  parser.add_argument(
    '--isa', choices=ISAS, default='native', help='avx2: restrict XLA, ATen and oneDNN to AVX2'
  )
  parser.add_argument(
    '--variants',
    nargs='+',
    choices=VARIANTS,
    default=list(VARIANTS),
    metavar='NAME',
    help=f'variants to time (default: all of {", ".join(map(repr, VARIANTS))})',
  )
  parser.add_argument('--scripts', type=int, default=3, help='runs of train.py and torch_lenet.py')
  parser.add_argument('--epochs', type=int, default=3, help='epochs of each of those runs')
  parser.add_argument('--out', type=pathlib.Path, help='write results.json and table.md here')
  parser.add_argument('--worker', choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument('--dump', help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# Registers and operands that only AVX-512 code uses, in objdump's AT&T syntax.
AVX512_ONLY = re.compile(r'%zmm|%k[1-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|\{1to')


def xla_isa_check(dump: pathlib.Path) -> str:
  """XLA's max ISA as its compiled modules' debug options state it, and AVX-512 code found."""
  isas = {
    line.split(':', 1)[1].strip().strip('"')
    for f in dump.glob('*.debug_options')
    for line in f.read_text().splitlines()
    if line.startswith('xla_cpu_max_isa')
  }
  check = f'XLA max ISA {"/".join(sorted(isas)) or "native"}'
  if shutil.which('objdump'):
    code = ''.join(
      subprocess.run(['objdump', '-d', str(f)], capture_output=True, text=True).stdout
      for f in dump.glob('*.o')
    )
    check += f', {len(AVX512_ONLY.findall(code))} AVX-512 operands in its code'
  return check


def torch_isa_check() -> str:
  import torch

  return f'ATen CPU capability {torch.backends.cpu.get_cpu_capability()}'


def worker(args: argparse.Namespace) -> dict:
  """Times ``args.worker`` in this process: its median rate over ``args.rounds`` rounds."""
  dataset = throughput.data_lib.load_fashion_mnist()
  name = args.worker
  if name in JAX_VARIANTS:
    variant = throughput.JaxVariant(JAX_VARIANTS[name], dataset, args.batch_size)
  else:
    if not throughput.torch_available():
      return {'skipped': 'PyTorch is not installed (pip install -e .[bench])'}
    norm, compiled = TORCH_VARIANTS[name]
    variant = throughput.TorchVariant(norm, dataset, args.batch_size)
    if compiled:
      import torch

      variant.trainer.net = torch.compile(variant.trainer.net)
  try:
    variant.run(args.warmup)
  except Exception as error:  # inductor without a C compiler, an unsupported CPU...
    return {'skipped': f'{type(error).__name__}: {str(error).splitlines()[0][:200]}'}
  rates = []
  for _ in range(args.rounds):
    seconds, steps = variant.run(args.steps)
    rates.append(steps * args.batch_size / seconds)
  if name in JAX_VARIANTS:
    isa = xla_isa_check(pathlib.Path(args.dump))
  else:
    isa = torch_isa_check()
  return {'examples_per_sec': statistics.median(rates), 'rounds': rates, 'isa': isa}


def run_worker(name: str, args: argparse.Namespace) -> dict:
  with tempfile.TemporaryDirectory() as dump:
    env = dict(os.environ, **isa_environment(args.isa))
    env['XLA_FLAGS'] = f'{env.get("XLA_FLAGS", "")} --xla_dump_to={dump}'.strip()
    command = [
      sys.executable, __file__, '--worker', name, '--rounds', str(args.rounds), '--steps',
      str(args.steps), '--warmup', str(args.warmup), '--batch-size', str(args.batch_size),
      '--dump', dump,
    ]  # fmt: skip
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
  lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
  if done.returncode and name in OPTIONAL:
    # torch.compile's generated C++ can abort the process (seen: a double free
    # in inductor's kernels on an AVX-512 EPYC): a row skipped, with the reason.
    last = (done.stderr.strip().splitlines() or ['no message'])[-1]
    return {'skipped': f'the process died (exit {done.returncode}): {last[:200]}'}
  if done.returncode or not lines:
    raise RuntimeError(f'the {name!r} process failed:\n{done.stderr[-3000:]}')
  return json.loads(lines[-1][len(RESULT) :])


def epoch_rates(args: argparse.Namespace) -> dict:
  """Per-epoch training rates of train.py and of the chapter's PyTorch loop, each its own process.

  ``train.py`` (configs/lenet_bn.py) and ``torch_lenet.py`` (nn.BatchNorm,
  D2L's DataLoader) train ``args.epochs`` epochs, in turn, ``args.scripts``
  times (the order reversed every other time), under the ISA restriction.
  A process's rate is the median of its epochs' examples/s as each script
  records them (training only: no compilation, no evaluation); the ratio is
  the median over the repeats of train.py's rate over PyTorch's.
  """
  rates = {'train.py': [], 'torch_lenet.py': []}
  env = dict(os.environ, **isa_environment(args.isa))
  for index in range(args.scripts):
    with tempfile.TemporaryDirectory() as tmp:
      commands = {
        'train.py': ([sys.executable, 'train.py', '--config', 'configs/lenet_bn.py',
                      f'--config.num_epochs={args.epochs}', '--config.progress_bar=False',
                      f'--workdir={tmp}/jaxbn'], f'{tmp}/jaxbn/metrics.jsonl'),
        'torch_lenet.py': ([sys.executable, 'benchmarks/torch_lenet.py',
                            f'--epochs={args.epochs}', f'--metrics={tmp}/torch.jsonl'],
                           f'{tmp}/torch.jsonl'),
      }  # fmt: skip
      for name in list(commands)[:: -1 if index % 2 else 1]:
        command, metrics = commands[name]
        subprocess.run(command, env=env, cwd=ROOT, check=True, capture_output=True)
        epochs = [json.loads(line) for line in pathlib.Path(metrics).read_text().splitlines()]
        rates[name].append(statistics.median(r['examples_per_sec'] for r in epochs))
    print(f'scripts {index + 1}/{args.scripts}: ' + ', '.join(
      f'{name} {r[-1]:,.0f}' for name, r in rates.items()
    ), flush=True)  # fmt: skip
  return {
    'epochs': args.epochs,
    'examples_per_sec_each_process': rates,
    'ratio': throughput.paired_ratio(rates, 'train.py', 'torch_lenet.py'),
  }


def pass_order(variants: list[str], index: int) -> list[str]:
  """The processes of pass ``index``: PyTorch ``nn.BatchNorm`` before and after each variant.

  The other variants run in the given order, reversed every other pass. The
  reference brackets each of them, so that a ratio compares processes next to
  each other in time and a steady drift of the host's speed cancels.
  """
  others = [name for name in variants if name != throughput.REFERENCE][:: -1 if index % 2 else 1]
  if throughput.REFERENCE not in variants:
    return others
  order = [throughput.REFERENCE]
  for name in others:
    order += [name, throughput.REFERENCE]
  return order


def bracketed_ratios(processes: list[tuple[str, dict]]) -> dict[str, float]:
  """Each variant's rate in a pass over the geometric mean of the two reference rates around it."""
  ratios = {}
  for at, (name, result) in enumerate(processes):
    if name == throughput.REFERENCE or 'examples_per_sec' not in result:
      continue
    before, after = (processes[at + d][1]['examples_per_sec'] for d in (-1, 1))
    ratios[name] = result['examples_per_sec'] / (before * after) ** 0.5
  return ratios


def measure(args: argparse.Namespace) -> dict:
  """``args.passes`` passes over the variants, one process each; rates and bracketed ratios."""
  load_before = os.getloadavg()
  passes = []
  for index in range(args.passes):
    passes.append([(name, run_worker(name, args)) for name in pass_order(args.variants, index)])
    print(f'pass {index + 1}/{args.passes}: ' + ', '.join(
      f'{name} {r.get("examples_per_sec", 0):,.0f}' for name, r in passes[-1]
    ), flush=True)  # fmt: skip
  with_reference = throughput.REFERENCE in args.variants
  ratios = [bracketed_ratios(processes) if with_reference else {} for processes in passes]
  rows = []
  for name in args.variants:
    processes = [result for p in passes for n, result in p if n == name]
    row = {'variant': name, 'processes': processes}
    rates = [r['examples_per_sec'] for r in processes if 'examples_per_sec' in r]
    if len(rates) < len(processes):
      row['skipped'] = next(r['skipped'] for r in processes if 'skipped' in r)
    else:
      row['examples_per_sec'] = statistics.median(rates)
      if name == throughput.REFERENCE:
        row['ratio_to_torch_nn_batchnorm'] = throughput.ratio_summary([1.0] * len(passes))
      elif with_reference:
        row['ratio_to_torch_nn_batchnorm'] = throughput.ratio_summary([r[name] for r in ratios])
    rows.append(row)
  return {
    'provenance': provenance.record(),
    'isa': args.isa,
    'environment': isa_environment(args.isa),
    'batch_size': args.batch_size,
    'passes': args.passes,
    'rounds_per_process': args.rounds,
    'steps_per_round': args.steps,
    'load_average_before_after': [load_before[0], os.getloadavg()[0]],
    'rows': rows,
    'end_to_end': epoch_rates(args) if args.scripts else None,
  }


def markdown(results: dict) -> str:
  """The README table: rates, paired ratios and the ISA each process reported."""
  record = results['provenance']
  lines = [
    f'Measured at commit {record["commit"][:12]} on {record["cpu_description"]}, ISA '
    f'{results["isa"]}; jax {record["packages"]["jax"]}, torch {record["packages"]["torch"]}; '
    f'{results["passes"]} passes, one process per variant in each, between two processes of '
    f'PyTorch `nn.BatchNorm`; each process {results["rounds_per_process"]} rounds of '
    f'{results["steps_per_round"]} steps, batch {results["batch_size"]}; a ratio is over the '
    'geometric mean of the two around it.',
    '',
    '| variant, own process | examples/s | vs PyTorch `nn.BatchNorm` (quartiles) | kernels |',
    '|---|---|---|---|',
  ]
  for row in results['rows']:
    if 'skipped' in row:
      lines.append(f'| {row["variant"]} | skipped: {row["skipped"]} | | |')
      continue
    ratio = 'no `nn.BatchNorm` processes'
    if 'ratio_to_torch_nn_batchnorm' in row:
      ratio = throughput.format_ratio(row['ratio_to_torch_nn_batchnorm'])
    isa = row['processes'][0]['isa']
    lines.append(f'| {row["variant"]} | {row["examples_per_sec"]:,.0f} | {ratio} | {isa} |')
  e2e = results.get('end_to_end')
  if e2e:
    rates = {name: statistics.median(r) for name, r in e2e['examples_per_sec_each_process'].items()}
    lines += [
      '',
      f'Per-epoch training rate of the scripts, each its own process ({e2e["epochs"]} epochs, '
      f'{len(e2e["examples_per_sec_each_process"]["train.py"])} runs each): `train.py` '
      f"{rates['train.py']:,.0f} examples/s, the chapter's PyTorch loop (`torch_lenet.py`, "
      f'D2L DataLoader) {rates["torch_lenet.py"]:,.0f}: '
      f'{throughput.format_ratio(e2e["ratio"])}.',
    ]
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  args = parse_args(argv)
  if args.worker:
    print(RESULT + json.dumps(worker(args)), flush=True)
    return
  results = measure(args)
  table = markdown(results)
  print('\n' + table)
  if args.out:
    throughput.write_results(args.out, results, table)


if __name__ == '__main__':
  main()
