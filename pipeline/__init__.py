"""URM pipeline: extract backbone features once, train uncertainty-aware reward heads on them, export.

One subpackage per stage, in the order the data takes (files -> rows -> backbone -> cache -> heads ->
training -> evaluation -> export -> serving); each ``__init__`` says what its modules own and
re-exports their public names. What may import what is stated once, in tests/test_layout.py.

  data/      records, sources (files, hub datasets pinned to a commit, fingerprints), nemo_turns, ratings,
             preferences, conversations, synthetic (the seeded generator), testing (known answers)
  features/  backbone (loading it), render (chat template -> ids, one BOS), batching (token budgets),
             embedding (ids -> last-token h), rows (a dataset as cache rows and parts), distributed (torchrun)
  cache/     layout (format, schema, CacheSpec), columns, manifest, parts, journals, writer, reader,
             parquet_pages (the fast read path)
  model/     heads (the heads and the score math: the one scoring module), modeling_urm and
             configuration_urm (the exported model's code; these three are shipped), heads_io (the heads folder)
  train/     losses, optimization, calibration, feature_stream (in memory or streamed), trainers
  eval/      evaluation (the metrics of a model's outputs), baselines, report
  export/    model_dir (the export's files), model_card
  serve/     scoring (an export's outputs), requests, batcher, app (`urm serve`)
  configs/   the typed stage configs and the option system, presets (the TOML files beside them)
  recipes/   one module per `urm` command, wiring the stages (the stages never import a recipe)

Cross-cutting modules, beside the subpackages: errors (the user-error types), atomic (every write),
hashing (checksums and fingerprints), device (device and dtype names and resolution), metrics (the
pure metrics training and evaluation report).
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
