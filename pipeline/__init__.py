"""URM pipeline: extract backbone features once, train uncertainty-aware reward heads on them, export.

Modules (one job each):
  records    - the normalised record types every loader produces
  sources    - reading rows out of jsonl / json / parquet files and hub datasets
  ratings    - HelpSteer2-schema rating rows -> RatingRow
  preferences- every pairwise format -> PreferencePair
  synthetic  - seeded HelpSteer2-schema generator for the offline demo and tests
  cache      - the Parquet feature cache (atomic parts + _manifest.json), and its fast reader
  config     - typed configs per stage, presets under configs/*.toml
"""

__version__ = "0.1.0"

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
