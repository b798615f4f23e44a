"""URM pipeline: extract backbone features once, train uncertainty-aware reward heads on them, export.

One subpackage per stage, in the order the data takes: data (files -> rows), features (the backbone -> h),
cache (the Parquet feature cache), model (the heads and the export's own files), train, eval, export, serve;
then configs (the typed options and presets) and recipes (one per `urm` command, wiring the stages). Each
subpackage's docstring lists its modules and what each owns: that is the one module map (docs/layout.md links
them), and tests/test_layout.py checks that it names every module and states what may import what.

Cross-cutting modules, beside the subpackages: errors (the user-error types), atomic (every write), locks (one
writer per folder), hashing (checksums and fingerprints), device (device and dtype names and resolution),
metrics (the pure metrics training and evaluation report), outputs (the one rule for where a command may write).
"""

__version__ = "0.1.0"

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
