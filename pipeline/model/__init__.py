"""The model: the reward heads and the score math, the heads folder, and the exported model's own files.

  heads              the heads on h and the score math: the one scoring module (shipped in every export)
  modeling_urm       ``URMForSequenceClassification``, the exported model (shipped)
  configuration_urm  ``URMConfig``, the backbone's config plus the heads' settings (shipped)
  heads_io           the heads folder: safetensors + heads.json (``HeadsMeta``)
  published          checkpoints in the published URM layout (SGLang's) read as heads and settings

The three shipped files import only torch, transformers and each other: `urm export` copies them
side by side into the export, where ``modeling_urm.py`` imports ``heads.py`` as a sibling. They are
imported by module (``pipeline.model.modeling_urm``) so that this package does not import transformers.
``heads_io`` may import the cross-cutting modules (errors, atomic, hashing).
"""

from pipeline.model.heads import (GATES, OUTPUTS, Heads, SoftmaxGate, ValueEnsemble, build_heads, gate_weights,
                                  head_outputs, init_linear_, last_token_index, p_chosen_bt, p_chosen_gaussian, score,
                                  score_variance, split_mean_logstd, unstandardize, urm_gate)
from pipeline.model.heads_io import (EXPORT_TENSORS, META, TENSORS, CacheIdentity, HeadsError, HeadsMeta, LabelScaling,
                                     PairCalibration, SigmaCalibration, StageRecord, check_tensors, load_heads,
                                     read_meta, save_heads)
from pipeline.model.published import (PUBLISHED_ARCHITECTURE, PUBLISHED_LOSS, checkpoint_settings,
                                      is_published_checkpoint, is_published_layout, published_heads, read_config_json)

__all__ = [
    "EXPORT_TENSORS", "GATES", "META", "OUTPUTS", "PUBLISHED_ARCHITECTURE", "PUBLISHED_LOSS", "TENSORS",
    "CacheIdentity", "Heads", "HeadsError", "HeadsMeta", "LabelScaling", "PairCalibration", "SigmaCalibration",
    "SoftmaxGate", "StageRecord", "ValueEnsemble", "build_heads", "check_tensors", "checkpoint_settings",
    "gate_weights", "head_outputs", "init_linear_", "is_published_checkpoint", "is_published_layout",
    "last_token_index", "load_heads", "p_chosen_bt", "p_chosen_gaussian", "published_heads", "read_config_json",
    "read_meta", "save_heads", "score", "score_variance", "split_mean_logstd", "unstandardize", "urm_gate",
]
