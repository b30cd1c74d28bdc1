"""``python -m benchmarks.run``: see README.md in this folder."""
from benchmarks.run import main

main()
