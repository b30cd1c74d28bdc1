"""``python -m benchmarks.eval_memory``: see README.md in this folder."""
from benchmarks.eval_memory import main

main()
