"""Export: trained heads stitched onto the backbone as a Hugging Face model directory.

  model_dir   the files of an export: shards (linked or rewritten), index, config, code, tokenizer, checksums
  model_card  the export's README.md, and the sigmoid example it shows

Imports the cross-cutting modules, ``pipeline.model`` and ``pipeline.features`` (the tokenizer's rendering).
"""

from pipeline.export.model_card import SIGMOID_ANSWERS, SIGMOID_PROMPT, model_card, sigmoid_example
from pipeline.export.model_dir import (CODE_FILES, HEADS_SHARD, ExportError, check_export_files, check_heads_fit,
                                       check_tokenizer_round_trip, export_checksums,
                                       place_shards, plan_shards, urm_section, write_code, write_config, write_index,
                                       write_tokenizer)

__all__ = [
    "CODE_FILES", "HEADS_SHARD", "SIGMOID_ANSWERS", "SIGMOID_PROMPT", "ExportError", "check_export_files",
    "check_heads_fit", "check_tokenizer_round_trip", "export_checksums",
    "model_card", "place_shards", "plan_shards", "sigmoid_example", "urm_section", "write_code", "write_config",
    "write_index", "write_tokenizer",
]
