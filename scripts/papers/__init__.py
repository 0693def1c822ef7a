"""Paper experiments: one module, or one folder of modules, per paper (scripts/README.md lists
them). Each is run as ``python -m scripts.papers.<paper>[.<part>]`` and writes its numbers
into ``docs/results/`` through :func:`scripts.results.record`."""
