"""``python -m benchmarks.phantom_recipes``: see README.md in this folder."""
from benchmarks.phantom_recipes import main

main()
