"""medkt benchmarks: ``python -m benchmarks.run --json out.json`` (see benchmarks/run.py)."""
