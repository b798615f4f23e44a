"""Data: files, hub datasets and the synthetic generator -> normalised records (``RatingRow``, ``PreferencePair``,
``Conversation``), with every bad row located by file, row and field.

  records        the record types every loader produces, and ``LoadReport``
  sources        where rows come from (files, hub datasets, ``synthetic:``), the row loop, fingerprints
  nemo_turns     the <extra_id_N> turn markers of NVIDIA's formats, and a prompt split on them
  ratings        HelpSteer2 / SteerLM / NeMo regression rows -> ``RatingRow``
  preferences    every pair format -> ``PreferencePair``
  response_pairs unlabelled pairs (two responses per prompt) for `urm curate --select`
  conversations  rows to score -> ``Conversation``; whether a scoring input holds pairs
  synthetic      the seeded HelpSteer2-schema generator (the demo and the tests)
  testing        data with a known answer for tests and benchmarks (imports torch; not re-exported here)

Imports only the cross-cutting modules of ``pipeline`` (errors, atomic, hashing).
"""

from pipeline.data.conversations import input_kind, load_conversations
from pipeline.data.nemo_turns import split_helpsteer2_prompt
from pipeline.data.preferences import (check_ends_with_assistant, drop_identical, load_preferences, messages_from,
                                       split_transcript)
from pipeline.data.preferences import FORMATS as PAIR_FORMATS
from pipeline.data.ratings import load_ratings, require_labels
from pipeline.data.ratings import FORMATS as RATING_FORMATS
from pipeline.data.response_pairs import load_response_pairs
from pipeline.data.records import PreferencePair, RatingRow
from pipeline.data.sources import (RowError, fingerprint, iter_records, not_utf8, parse_synthetic, pin_revision,
                                   source_kind, source_label, source_stem, split_hub_id)
from pipeline.data.synthetic import make_preferences, make_ratings, write_helpsteer2_jsonl

__all__ = [
    "check_ends_with_assistant", "drop_identical", "fingerprint", "input_kind", "iter_records", "load_conversations",
    "load_preferences", "load_ratings", "load_response_pairs", "make_preferences", "make_ratings", "messages_from",
    "not_utf8", "PAIR_FORMATS", "parse_synthetic", "pin_revision", "PreferencePair", "RATING_FORMATS", "RatingRow",
    "require_labels", "RowError", "source_kind", "source_label", "source_stem", "split_helpsteer2_prompt",
    "split_hub_id", "split_transcript", "write_helpsteer2_jsonl",
]
