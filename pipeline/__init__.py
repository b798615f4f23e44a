"""URM pipeline: extract backbone features once, train uncertainty-aware reward heads on them, export.

Modules (one job each):
  records    - the normalised record types every loader produces
  sources    - reading rows out of jsonl / json / parquet files and hub datasets
  ratings    - HelpSteer2-schema rating rows -> RatingRow
  preferences- every pairwise format -> PreferencePair
  synthetic  - seeded HelpSteer2-schema generator for the offline demo and tests
  cache      - the Parquet feature cache (atomic parts + _manifest.json), and its fast reader
  config     - typed configs per stage, presets under configs/*.toml
  backbone   - loading the frozen backbone (hub id, directory, GGUF)
  render     - chat template -> token ids with exactly one BOS
  extract    - token-budget batches -> last-token hidden states -> cache
  heads, losses, metrics, train, heads_io - the two training stages and the heads folder
  configuration_urm, modeling_urm - the exported model's code (self-contained)
  export, model_card - heads + backbone -> Hugging Face model directory
  conversations, score - batched scoring with uncertainty
"""

__version__ = "0.1.0"

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
