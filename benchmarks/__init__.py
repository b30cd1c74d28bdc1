"""medkt benchmarks, one package per study: ``python -m benchmarks.<study>`` (index: benchmarks/README.md;
``make bench`` runs ``benchmarks.run``)."""
