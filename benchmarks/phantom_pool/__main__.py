"""``python -m benchmarks.phantom_pool``: see README.md in this folder."""
from benchmarks.phantom_pool import main

main()
