"""``python -m benchmarks.phantom_q2``: see README.md in this folder."""
from benchmarks.phantom_q2 import main

main()
