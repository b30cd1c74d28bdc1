"""``python -m benchmarks.preflight_timing``: see README.md in this folder."""
from benchmarks.preflight_timing import main

main()
