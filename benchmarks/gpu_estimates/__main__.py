"""``python -m benchmarks.gpu_estimates``: see README.md in this folder."""
from benchmarks.gpu_estimates import main

main()
