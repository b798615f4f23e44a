"""The model: the reward heads and the score math, the heads folder, and the exported model's own files.

  heads              the heads on h and the score math: the one scoring module (shipped in every export)
  modeling_urm       ``URMForSequenceClassification``, the exported model (shipped)
  configuration_urm  ``URMConfig``, the backbone's config plus the heads' settings (shipped)
  heads_io           the heads folder: safetensors + heads.json (``HeadsMeta``)
  heads_source       heads from a heads folder, an export or a published checkpoint; the check features fit them
  rewards            reward transforms on the heads' outputs: mean, lcb, elcb, min, uwo (`urm score`, `urm serve`)
  published          checkpoints in the published URM layout (SGLang's) read as heads and settings

The three shipped files import only torch, transformers and each other: `urm export` copies them
side by side into the export, where ``modeling_urm.py`` imports ``heads.py`` as a sibling. They are
imported by module (``pipeline.model.modeling_urm``) so that this package does not import transformers.
``heads_io`` may import the cross-cutting modules (errors, atomic, hashing).
"""

from pipeline.model.heads import (GATES, OUTPUTS, VALUE_PREFIXES, Heads, SoftmaxGate, ValueEnsemble, build_heads,
                                  epistemic_variance, head_outputs, init_linear_, last_token_index, p_chosen_bt,
                                  p_chosen_gaussian, score, score_variance, split_mean_logstd, unstandardize, urm_gate)
from pipeline.model.heads_io import (EXPORT_TENSORS, META, CacheIdentity, HeadsError, HeadsMeta, LabelScaling,
                                     PairCalibration, SigmaCalibration, StageRecord, check_tensors, copy_heads,
                                     heads_reader, heads_writer, load_heads, meta_file, read_meta, save_heads)
from pipeline.model.heads_source import check_features, check_same_backbone, load_for_evaluation
from pipeline.model.published import (PUBLISHED_ARCHITECTURE, PUBLISHED_LOSS, check_checkpoint_tensors,
                                      checkpoint_settings, is_published_layout, published_heads, published_settings)
from pipeline.model.rewards import (RISK_RANGE, RISK_TRANSFORMS, SUBTRACTS, TRANSFORMS, lower_bound, needs_ensemble,
                                    needs_posterior, reward, rewards_of, risk_ok, uncertainty_weighted, worst_member)

__all__ = [
    "build_heads", "CacheIdentity", "check_checkpoint_tensors", "check_features", "check_same_backbone",
    "check_tensors", "checkpoint_settings", "copy_heads", "epistemic_variance", "EXPORT_TENSORS", "GATES",
    "head_outputs", "Heads", "heads_reader", "heads_writer", "HeadsError", "HeadsMeta", "init_linear_",
    "is_published_layout", "LabelScaling", "last_token_index", "load_for_evaluation", "load_heads", "lower_bound",
    "META", "meta_file", "needs_ensemble", "needs_posterior", "OUTPUTS", "p_chosen_bt", "p_chosen_gaussian",
    "PairCalibration", "PUBLISHED_ARCHITECTURE", "published_heads", "PUBLISHED_LOSS", "published_settings", "read_meta",
    "reward", "rewards_of", "risk_ok", "RISK_RANGE", "RISK_TRANSFORMS", "save_heads", "score", "score_variance",
    "SigmaCalibration", "SoftmaxGate", "split_mean_logstd", "StageRecord", "SUBTRACTS", "TRANSFORMS",
    "uncertainty_weighted", "unstandardize", "urm_gate", "VALUE_PREFIXES", "ValueEnsemble", "worst_member",
]
