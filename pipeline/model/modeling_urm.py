"""URMForSequenceClassification: a frozen backbone plus the uncertainty-aware reward heads.

Imports only torch, transformers and its sibling files: `urm export` copies this file, ``heads.py``
(the heads and the score math, the very module training uses) and ``configuration_urm.py`` into
every export, where ``config.json``'s ``auto_map`` points ``AutoModelForSequenceClassification`` at
it. Works under transformers 4.57.x and 5.x.

``config.json`` is the backbone's own config plus a ``urm`` section with the heads' shapes, laid out as
the published URM-LLaMa-3.1-8B is (so SGLang serves it): ``architectures``
["LlamaForSequenceClassificationWithNormal_Weights"] where SGLang's class computes what this one does
(a URM gate as wide as the backbone, no value-head bias), ``num_labels`` 2K, ``score.weight`` [2K, d],
the gate under ``weights.fc.*``. ``model_type`` is "urm" (``configuration_urm.URMConfig``, through
``auto_map``): transformers refuses the checkpoint without ``trust_remote_code`` rather than build a
plain ``LlamaForSequenceClassification`` whose first logit would be one attribute's mean. The
backbone's own type is ``urm["backbone_model_type"]``.

The math (docs/method.md section 1; ``heads.head_outputs``, on tensors named as in training):
  h                  last-token hidden state of the backbone (final layer, after the final norm)
  score(h)           value head [2K, d], rows interleaved: mu_k = row 2k, log sigma_k = row 2k+1
  w(h)               gate: ``weights`` (URM: SELU MLP, unnormalised), ``softmax_gate`` (ArmoRM:
                     softmax(x / T) over attributes times a learned scale), or 1/K without a gate
  s = sum_k w_k mu_k                     -> logits[:, 0]
  Var s = sum_k w_k^2 sigma_k^2          -> score_std = sqrt(Var s)
With an ensemble (``ensemble.weight`` [M, 2K, d]) each member's score under the same weights gives
``ensemble_scores`` [B, M] and their std ``ensemble_std`` [B] (epistemic spread). With a ridge posterior
(``posterior.{g}.*`` tensors, a closed-form value head; ``urm["posterior"]`` gives their shapes)
``attribute_epistemic_stds`` [B, K] and ``epistemic_std`` [B] = sqrt(sum_k w_k^2 Var_epi,k) (docs/method.md 10);
an export without it (older, or AdamW-trained heads) returns neither.

Which token is "last": the position of the LAST 1 in ``attention_mask`` (callers pad on either
side; RewardBench zeroes a doubled BOS's mask entry, leaving a hole). Position ids come from the
mask (cumsum - 1), so left padding and holes see the positions of the unpadded sequence. A doubled
leading BOS (tokenising already-templated text adds a second one on Llama 3) is masked out the same
way, so such input scores the same as the rendering used for training (docs/method.md section 5).
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
import transformers
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
from transformers.utils import ModelOutput

from .configuration_urm import URMConfig
from .heads import build_heads, head_outputs, last_token_index, p_chosen_bt, p_chosen_gaussian

# ----------------------------------------------------------------------------------------------
# Which positions to read


def mask_doubled_bos(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos: Optional[int]) -> torch.Tensor:
    """Zero the mask of every leading BOS that another BOS follows: [BOS, BOS, x] reads as [BOS, x]."""
    if bos is None or input_ids is None:
        return attention_mask
    attended = attention_mask.bool()
    is_bos = (input_ids == bos) & attended
    leading = is_bos & ((attended & ~is_bos).cumsum(1) == 0)  # BOS before the first other token
    drop = leading & (leading.cumsum(1) < leading.sum(1, keepdim=True))  # all but the last of them
    return attention_mask.masked_fill(drop, 0)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip masked tokens: left padding and holes give the unpadded positions."""
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


# ----------------------------------------------------------------------------------------------
# The model


@dataclass
class URMOutput(ModelOutput):
    """logits [B, 1] = the score; per-attribute means, stds and gate weights [B, K]; score_std [B];
    ensemble_scores [B, M] and ensemble_std [B] with several value heads; base_score [B] when the
    backbone was a reward model (its own head's score); epistemic_std [B] and attribute_epistemic_stds [B, K]
    when the heads carry a ridge posterior (last, so the tuple positions of the others do not move)."""

    logits: Optional[torch.FloatTensor] = None
    score_std: Optional[torch.FloatTensor] = None
    attribute_means: Optional[torch.FloatTensor] = None
    attribute_stds: Optional[torch.FloatTensor] = None
    gating_weights: Optional[torch.FloatTensor] = None
    ensemble_scores: Optional[torch.FloatTensor] = None
    ensemble_std: Optional[torch.FloatTensor] = None
    base_score: Optional[torch.FloatTensor] = None
    epistemic_std: Optional[torch.FloatTensor] = None
    attribute_epistemic_stds: Optional[torch.FloatTensor] = None


def urm_settings(config) -> dict:
    """The heads' shapes, from ``config.urm`` (written by `urm export`, every key present)."""
    settings = getattr(config, "urm", None)
    if not isinstance(settings, dict) or "attributes" not in settings:
        raise ValueError("this config has no 'urm' section: it is not a model exported by `urm export`")
    return settings


def pair_temperatures(config) -> dict:
    """The temperatures of P(chosen > rejected), fitted on validation pairs ({"bt": T, "gaussian": T};
    1 and 1 for an export made before they were)."""
    return urm_settings(config).get("pair_temperature") or {"bt": 1.0, "gaussian": 1.0}


def backbone_model(config) -> nn.Module:
    """The backbone's base model (LlamaModel, ...) for ``urm["backbone_model_type"]`` (an export made
    before it was written kept the backbone's type as ``config.model_type``), weights under ``model.*``."""
    kind = urm_settings(config).get("backbone_model_type") or config.model_type
    return getattr(transformers, MODEL_MAPPING_NAMES[kind])(config)


class URMForSequenceClassification(PreTrainedModel):
    """Backbone (``model.*``) + value head ``score`` [2K, d] + gate; ``logits[:, 0]`` is the reward.

    ``config`` is the backbone's own config (LlamaConfig, ...) plus a ``urm`` dict: attributes (the K
    names, in the value head's row order), members (M), value_bias, gate ("urm" | "softmax" | None),
    gate_hidden, gate_temperature, base_score (the backbone was a 1-label reward model whose head is
    kept as ``base_score``), base_score_bias, posterior (each label group's ridge posterior shape, or
    None: then no epistemic_std).
    """

    config_class = URMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = []  # the backbone's own (e.g. LlamaDecoderLayer) are collected from it
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_flex_attn = True
    # A causal-LM backbone's shards also hold its LM head: read, not needed here.
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"(^|\.)rotary_emb\.inv_freq$"]
    # The heads stay in fp32 when the backbone loads in bf16 or fp16: in bf16 a score near 10 moves in steps
    # of 0.06 and two close answers tie exactly (P(better) = 0.5 from rounding alone). They are a few
    # thousand parameters; head_outputs casts the hidden state up to them. Set per instance in __init__
    # (transformers refuses a name that is not a module of the model, and the gate's kind varies).
    HEAD_MODULES = ("score", "ensemble", "weights", "softmax_gate", "base_score", "posterior")

    def __init__(self, config):
        super().__init__(config)
        urm = urm_settings(config)
        self.model = backbone_model(config)
        d = config.hidden_size
        build_heads(self, d, len(urm["attributes"]), urm["members"], urm["value_bias"], urm["gate"],
                    urm["gate_hidden"], urm["gate_temperature"], urm.get("posterior"))
        self.base_score = nn.Linear(d, 1, bias=urm["base_score_bias"]) if urm["base_score"] else None
        self._keep_in_fp32_modules_strict = [name for name in self.HEAD_MODULES if getattr(self, name) is not None]
        self.post_init()

    def _init_weights(self, module):
        """Only for weights missing from a checkpoint: Linear ~ N(0, 0.02), zero bias."""
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(mean=0.0, std=0.02)
            if module.bias is not None:
                module.bias.data.zero_()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def p_chosen(self, chosen: URMOutput, rejected: URMOutput) -> dict:
        """P(chosen > rejected) for each row of two outputs, under Bradley-Terry and under the Gaussian
        scores, at the temperatures fitted on validation pairs (docs/method.md 1, 2)."""
        t = pair_temperatures(self.config)
        s_c, s_r = chosen.logits[:, 0], rejected.logits[:, 0]
        return {"p_chosen_bt": p_chosen_bt(s_c, s_r, t["bt"]),
                "p_chosen_gaussian": p_chosen_gaussian(s_c, s_r, chosen.score_std.square(), rejected.score_std.square(),
                                                       t["gaussian"])}

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None,
                return_dict=None, **kwargs):
        """Score each row; ``return_dict=False`` gives a tuple that starts with the logits."""
        for unused in ("labels", "use_cache", "token_type_ids"):
            kwargs.pop(unused, None)
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if attention_mask is None:
            attention_mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        attention_mask = mask_doubled_bos(input_ids, attention_mask, self.config.bos_token_id)
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        h = hidden[rows, last_token_index(attention_mask).to(hidden.device)]
        out = head_outputs(self, h)
        out["logits"] = out.pop("score")[:, None]
        if self.base_score is not None:
            out["base_score"] = self.base_score(h.to(self.base_score.weight.dtype))[:, 0]
        output = URMOutput(**out)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return output if use_dict else output.to_tuple()
