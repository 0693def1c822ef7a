"""Benchmark cases; each module registers its cases with ``bench.case``."""
