"""``python -m benchmarks.mutation [--label after] [--only NAME ...]``: run the mutation list and
store the tally under ``--label`` in ``benchmarks/mutation/results.json`` (other labels kept)."""
from __future__ import annotations

import argparse
import datetime
import json
import subprocess
from pathlib import Path

from benchmarks.mutation.mutations import MUTATIONS
from benchmarks.mutation.runner import ROOT, run

RESULTS = Path(__file__).with_name("results.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__)
    ap.add_argument("--label", default="latest", help="key of this run in results.json (e.g. before / after)")
    ap.add_argument("--only", nargs="*", help="run only these mutation names")
    ap.add_argument("--list", action="store_true", help="print the mutation names and exit")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the listed tests")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    ap.add_argument("--output", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    muts = [m for m in MUTATIONS if not args.only or m.name in args.only]
    if args.list:
        for m in MUTATIONS:
            print(f"{m.name:32s} {m.file}: {m.what}")
        return 0
    if args.only and len(muts) != len(args.only):
        unknown = sorted(set(args.only) - {m.name for m in MUTATIONS})
        raise SystemExit(f"unknown mutation name(s) {unknown}; see --list")
    # the code under test is the tree at the start (the scratch copy), whatever is committed meanwhile
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "medkt", "tests"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
    tally = run(muts, timeout=args.timeout, baseline=not args.no_baseline)
    tally = {"commit": commit + ("+uncommitted" if dirty else ""),
             "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), **tally}
    results = json.loads(args.output.read_text()) if args.output.is_file() else {}
    results[args.label] = tally
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"{tally['caught']}/{tally['total']} caught; survivors: {', '.join(tally['survivors']) or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
