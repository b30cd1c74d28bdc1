"""``python -m benchmarks.phantom_domain_gap``: see README.md in this folder."""
from benchmarks.phantom_domain_gap import main

main()
