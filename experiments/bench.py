"""The benchmark harness: `python -m experiments.bench [--only=NAME,...] [--sweep]`.

Each bench lives in `experiments/benches/<name>.py` and defines
  NAME: str, HELP: str, and run(args) -> iterable of dict rows.
Every row is printed as one JSON line `{"bench": NAME, ...figures}` as soon as it is measured,
and all rows are printed again as a readable table at the end. Speed figures are quoted as
ratios against something measured in the same run (a sort, a matmul), because this machine is
shared and bare seconds drift.
"""
from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

from experiments import benches

# Benches appear in this order when all are run; others follow alphabetically.
ORDER = ("advantages", "rollout", "train_step", "rl_step")


def available_benches() -> dict:
  names = [m.name for m in pkgutil.iter_modules(benches.__path__) if not m.name.startswith("_")]
  names = sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
  return {n: importlib.import_module(f"experiments.benches.{n}") for n in names}


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def print_table(rows: list[dict], out=sys.stdout) -> None:
  by_bench: dict[str, list[dict]] = {}
  for r in rows:
    by_bench.setdefault(r["bench"], []).append(r)
  for name, rs in by_bench.items():
    keys = [k for k in rs[0] if k != "bench"]
    for r in rs[1:]:
      keys += [k for k in r if k != "bench" and k not in keys]
    cells = [[_fmt(r.get(k, "")) for k in keys] for r in rs]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    print(f"\n== {name} ==", file=out)
    print("  ".join(k.rjust(w) for k, w in zip(keys, widths)), file=out)
    for c in cells:
      print("  ".join(v.rjust(w) for v, w in zip(c, widths)), file=out)


def main(argv=None) -> int:
  all_benches = available_benches()
  epilog = "\n".join(f"  {n}: {m.HELP}" for n, m in all_benches.items())
  parser = argparse.ArgumentParser(
      prog="python -m experiments.bench", description=__doc__,
      epilog="benches:\n" + epilog, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--only", default="", help="comma-separated bench names (default: all)")
  parser.add_argument("--sweep", action="store_true", help="run the bench's size sweep, where it has one")
  parser.add_argument("--repeats", type=int, default=0, help="timing repeats (0: the bench's default)")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()] or list(all_benches)
  unknown = [n for n in names if n not in all_benches]
  if unknown:
    parser.error(f"unknown bench(es) {unknown}; available: {sorted(all_benches)}")
  rows = []
  for n in names:
    for row in all_benches[n].run(args):
      row = {"bench": n, **row}
      print(json.dumps(row), flush=True)
      rows.append(row)
  print_table(rows)
  return 0


if __name__ == "__main__":
  sys.exit(main())
