"""``python -m benchmarks.gpu_smoke``: see README.md in this folder."""
import sys

from benchmarks.gpu_smoke import main

sys.exit(0 if main()["all_ok"] else 1)
