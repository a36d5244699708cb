"""edufl's benchmarks: one script per question, ``python -m bench`` runs them all.

Not part of the installed package nor of the test run. Every script follows `bench.common`'s
conventions (progress on stderr, a Markdown table on stdout, figures in JSON under
``runs/bench/``); see ``docs/benchmarks.md`` for the questions, the results and what changed.
"""
