"""URM pipeline: extract backbone features once, train uncertainty-aware reward heads on them, export.

Recipes (pipeline/recipes/, one per `urm` command) wire the components; components never import a
recipe. Components, one job each:
  data       records (the normalised record types), sources (files, hub datasets, fingerprints),
             ratings (HelpSteer2 rows), preferences (every pair format), conversations (rows to
             score), synthetic (seeded HelpSteer2-schema generator), testing (data with a known answer)
  config     typed configs per stage, presets shipped in pipeline/configs/*.toml
  features   backbone (loading it), render (chat template -> ids, one BOS), batching (token-budget
             batches), embedding (ids -> last-token h), rows (a dataset as cache rows and parts)
  cache      cache (format and writer), cache_reader (into tensors), parquet_pages (the fast path)
  heads      heads (the heads and the score math: the one scoring module, shipped in exports),
             losses, metrics, trainers (the two AdamW loops), heads_io (the heads folder, HeadsMeta)
  export     configuration_urm, modeling_urm (the exported model's code), model_dir (its files),
             model_card; scoring (an exported model's outputs as rows)
  plumbing   atomic (every write), errors (the one user-error type)
"""

__version__ = "0.1.0"

ATTRIBUTES = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
