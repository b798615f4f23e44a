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

import contextlib
import logging

__version__ = "0.1.0"

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")

# How the pipeline speaks: each module logs to its own logger (``logging.getLogger(__name__)``, under "pipeline");
# where the lines go is the application's choice (`urm` prints them to stderr, cli.py). With logging left
# unconfigured, Python's last-resort handler shows warnings and errors and INFO stays quiet. Progress bars show
# unless the "pipeline" logger itself is set above INFO (`urm --quiet`).


def progress_shown() -> bool:
    """Whether progress bars show: not when the "pipeline" logger is set above INFO (`urm --quiet`)."""
    return logging.getLogger(__name__).level <= logging.INFO


@contextlib.contextmanager
def unheard(*names: str):
    """The loggers ``names`` (and theirs below) say nothing under ERROR for the block: for fits the user did not ask
    for (a baseline's, a cross-validation fold's), whose lines would read as the run's own."""
    speakers = [logging.getLogger(name) for name in names]
    before = [speaker.level for speaker in speakers]
    for speaker in speakers:
        speaker.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for speaker, level in zip(speakers, before):
            speaker.setLevel(level)
