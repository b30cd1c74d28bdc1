"""``python -m benchmarks.phantom_generality``: see README.md in this folder."""
from benchmarks.phantom_generality import main

main()
