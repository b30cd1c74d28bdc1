"""Mutation testing of medkt's engine: does the default suite notice a broken formula or option?

Each `Mutation` replaces one exact snippet of a source file
(a documented option ignored, a formula changed) and names the few tests that should notice.
`run` applies each mutation to a scratch copy of the repository
(the working tree is never edited), runs only those tests with ``pytest -x -q`` and records whether
they failed ("caught") or passed ("survived"). ``python -m benchmarks.mutation`` writes the tally
to ``benchmarks/mutation/results.json`` (see README.md in this folder).
"""
