r"""Steady-state training rates of two commits, each commit's own benchmark in its own processes.

  python benchmarks/commits.py 08b7358 HEAD --pairs 4 --out results/commits

For "throughput must not drop" across a change: checks each commit out
(``git worktree``, detached, in a temporary folder), then runs the two
commits' ``benchmarks/throughput.py --skip-torch --epochs 0`` in alternating
processes (``--pairs`` of them, the order reversed every other pair), each
timing jaxbn's LeNet variants with that commit's code and its own method. A
ratio is the median over pairs of the NEW commit's rate over the OLD one's in
the same pair, with its quartiles. Writes ``results.json`` (with provenance)
and ``table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

import throughput

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from d2l_lenet import provenance  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument('old', help='the commit before the change')
  parser.add_argument('new', help='the commit after it')
  parser.add_argument('--pairs', type=int, default=4, help='processes of each commit')
  parser.add_argument('--repeats', type=int, default=9, help='timed rounds in each process')
  parser.add_argument('--out', type=pathlib.Path, help='write results.json and table.md here')
  return parser.parse_args(argv)


def rates_at(tree: pathlib.Path, repeats: int) -> dict[str, float]:
  """``{variant: examples/s}`` from one run of ``tree``'s throughput benchmark, JAX only."""
  script = tree / 'benchmarks/throughput.py'
  with tempfile.TemporaryDirectory() as tmp:
    # Older versions write one JSON file (--json); newer ones a folder (--out).
    takes_out = "'--out'" in script.read_text()
    output = ['--out', tmp] if takes_out else ['--json', f'{tmp}/results.json']
    command = [sys.executable, str(script), '--skip-torch', '--epochs', '0',
               '--repeats', str(repeats), *output]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(command, cwd=tree, env=env, check=True, capture_output=True)
    rows = json.loads(pathlib.Path(tmp, 'results.json').read_text())['rows']
  return {row['variant']: row['examples_per_sec'] for row in rows}


def measure(args: argparse.Namespace) -> dict:
  commits = {
    name: subprocess.run(
      ['git', 'rev-parse', ref], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()
    for name, ref in (('old', args.old), ('new', args.new))
  }
  runs = {'old': [], 'new': []}
  with tempfile.TemporaryDirectory() as tmp:
    trees = {name: pathlib.Path(tmp, name) for name in commits}
    for name, commit in commits.items():
      subprocess.run(['git', 'worktree', 'add', '--detach', str(trees[name]), commit],
                     cwd=ROOT, check=True, capture_output=True)  # fmt: skip
    try:
      for index in range(args.pairs):
        for name in ('old', 'new')[:: -1 if index % 2 else 1]:
          runs[name].append(rates_at(trees[name], args.repeats))
        print(f'pair {index + 1}/{args.pairs}: {runs["old"][-1]} -> {runs["new"][-1]}', flush=True)
    finally:
      for tree in trees.values():
        subprocess.run(['git', 'worktree', 'remove', '--force', str(tree)], cwd=ROOT, check=False)
  variants = [v for v in runs['new'][0] if all(v in r for r in runs['old'] + runs['new'])]
  rows = []
  for variant in variants:
    rates = {name: [r[variant] for r in runs[name]] for name in runs}
    rows.append({
      'variant': variant,
      'old_examples_per_sec': statistics.median(rates['old']),
      'new_examples_per_sec': statistics.median(rates['new']),
      'new_over_old': throughput.paired_ratio(rates, 'new', 'old'),
    })  # fmt: skip
  return {
    'provenance': provenance.record(),
    'commits': commits,
    'pairs': args.pairs,
    'repeats': args.repeats,
    'runs': runs,
    'rows': rows,
  }


def markdown(results: dict) -> str:
  record, commits = results['provenance'], results['commits']
  lines = [
    f'{commits["old"][:12]} -> {commits["new"][:12]} on {record["cpu_description"]}; '
    f'{results["pairs"]} processes of each, alternating, each {results["repeats"]} rounds.',
    '',
    '| variant | old examples/s | new examples/s | new / old (quartiles) |',
    '|---|---|---|---|',
  ]
  for row in results['rows']:
    lines.append(
      f'| {row["variant"]} | {row["old_examples_per_sec"]:,.0f} | '
      f'{row["new_examples_per_sec"]:,.0f} | {throughput.format_ratio(row["new_over_old"])} |'
    )
  return '\n'.join(lines) + '\n'


def main(argv=None) -> None:
  args = parse_args(argv)
  results = measure(args)
  table = markdown(results)
  print('\n' + table)
  if args.out:
    throughput.write_results(args.out, results, table)


if __name__ == '__main__':
  main()
