"""Coverage-guided fuzzing of imago's format drivers and command line (atheris).

Each target (:mod:`fuzz.targets`) turns one input into an image held in memory (or in a
per-process tmpfs file for the command line), opens it with the public API under an explicit
format and a gate that opens nothing else, and exercises it. :mod:`fuzz.verdict` decides which
outcomes are acceptable; :mod:`fuzz.engine` runs a target under atheris; ``python -m fuzz``
runs campaigns. See ``fuzz/README.md``.
"""
