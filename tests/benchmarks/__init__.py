"""Tests of the benchmark harness (top-level ``bench/``). Not named ``tests/bench``: pytest
puts ``tests/`` on ``sys.path``, where such a package would shadow the harness."""
