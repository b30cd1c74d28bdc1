"""``python -m benchmarks.segmentation_timing``: see README.md in this folder."""
from benchmarks.segmentation_timing import main

main()
