"""URMForSequenceClassification: a frozen backbone plus the uncertainty-aware reward heads.

Self-contained (imports only torch and transformers): `urm export` copies this file into every
export, where ``config.json``'s ``auto_map`` points ``AutoModelForSequenceClassification`` at it.
Works under transformers 4.57.x and 5.x.

``config.json`` is the backbone's own config (``model_type`` "llama", ...) plus a ``urm`` section
with the heads' shapes; ``configuration_urm.URMConfig`` (``auto_map["AutoConfig"]``) is the
backbone's config class with that section, so ``model_type`` stays the backbone's and loading the
tokenizer or config without ``trust_remote_code`` needs no custom code (no prompt).

The math (METHOD.md section 1; the same lines as pipeline/heads.py, under the same tensor names):
  h                  last-token hidden state of the backbone (final layer, after the final norm)
  score(h)           value head [2K, d], rows interleaved: mu_k = row 2k, log sigma_k = row 2k+1
  w(h)               gate: ``weights`` (URM: SELU MLP, unnormalised), ``softmax_gate`` (ArmoRM:
                     softmax(x / T) over attributes times a learned scale), or 1/K without a gate
  s = sum_k w_k mu_k                     -> logits[:, 0]
  Var s = sum_k w_k^2 sigma_k^2          -> score_std = sqrt(Var s)
With an ensemble (``ensemble.weight`` [M, 2K, d]) each member's score under the same weights gives
``ensemble_scores`` [B, M] and their std ``ensemble_std`` [B] (epistemic spread).

Which token is "last": the position of the LAST 1 in ``attention_mask`` (callers pad on either
side; RewardBench zeroes a doubled BOS's mask entry, leaving a hole). Position ids come from the
mask (cumsum - 1), so left padding and holes see the positions of the unpadded sequence. A doubled
leading BOS (tokenising already-templated text adds a second one on Llama 3) is masked out the same
way, so such input scores the same as the rendering used for training (METHOD.md section 5).
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
import transformers
from transformers import PreTrainedModel
from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES
from transformers.utils import ModelOutput

from .configuration_urm import URMConfig

# ----------------------------------------------------------------------------------------------
# The score math (copied from pipeline/heads.py; keep the two in step)


def split_mean_logstd(out: torch.Tensor):
    """Interleaved value-head output [..., 2K] -> (mu [..., K], log_sigma [..., K])."""
    return out[..., 0::2], out[..., 1::2]


def score(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """s = sum_k w_k mu_k."""
    return (w * mu).sum(-1)


def score_variance(w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Var s = sum_k w_k^2 sigma_k^2 (attributes treated as independent)."""
    return (w.square() * sigma.square()).sum(-1)


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


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of the mask (right or left padding, holes allowed)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(positions.dtype) * positions).argmax(dim=1)


# ----------------------------------------------------------------------------------------------
# The heads (parameter names = the export's tensor names)


class ValueEnsemble(nn.Module):
    """M value heads in one weight [M, 2K, d]: h [B, d] -> [M, B, 2K]."""

    def __init__(self, d: int, k: int, members: int, bias: bool):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(members, 2 * k, d))
        self.bias = nn.Parameter(torch.zeros(members, 2 * k)) if bias else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(self.weight, h.transpose(-1, -2)).transpose(-1, -2)
        return out if self.bias is None else out + self.bias[:, None, :]


def mlp(d: int, hidden: int, k: int, n_hidden: int, act) -> nn.Sequential:
    """Linear(d,h) -> act -> (Linear(h,h) -> act) * (n_hidden - 1) -> Linear(h,k)."""
    layers = []
    for i in range(n_hidden):
        layers += [nn.Linear(d if i == 0 else hidden, hidden), act()]
    return nn.Sequential(*layers, nn.Linear(hidden, k))


class SoftmaxGate(nn.Module):
    """ArmoRM-style gate: ReLU MLP (3 hidden layers), softmax(x / T) over attributes, times a scale."""

    def __init__(self, d: int, k: int, hidden: int, temperature: float):
        super().__init__()
        self.layers = mlp(d, hidden, k, 3, nn.ReLU)
        self.scale = nn.Parameter(torch.ones(1))
        self.temperature = temperature

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.layers(h) / self.temperature, dim=-1) * self.scale


@dataclass
class URMOutput(ModelOutput):
    """logits [B, 1] = the score; per-attribute means, stds and gate weights [B, K]; score_std [B];
    ensemble_scores [B, M] and ensemble_std [B] with several value heads; base_score [B] when the
    backbone was a reward model (its own head's score)."""

    logits: Optional[torch.FloatTensor] = None
    score_std: Optional[torch.FloatTensor] = None
    attribute_means: Optional[torch.FloatTensor] = None
    attribute_stds: Optional[torch.FloatTensor] = None
    gating_weights: Optional[torch.FloatTensor] = None
    ensemble_scores: Optional[torch.FloatTensor] = None
    ensemble_std: Optional[torch.FloatTensor] = None
    base_score: Optional[torch.FloatTensor] = None


def urm_settings(config) -> dict:
    """The heads' shapes, from ``config.urm`` (written by `urm export`)."""
    settings = getattr(config, "urm", None)
    if not isinstance(settings, dict) or "attributes" not in settings:
        raise ValueError("this config has no 'urm' section: it is not a model exported by `urm export`")
    return {**URM_DEFAULTS, **settings}


URM_DEFAULTS = {"members": 1, "value_bias": False, "gate": None, "gate_hidden": None, "gate_temperature": 10.0,
                "base_score": False, "base_score_bias": False}


def backbone_model(config) -> nn.Module:
    """The backbone's base model (LlamaModel, ...) for ``config.model_type``, weights under ``model.*``."""
    return getattr(transformers, MODEL_MAPPING_NAMES[config.model_type])(config)


class URMForSequenceClassification(PreTrainedModel):
    """Backbone (``model.*``) + value head ``score`` [2K, d] + gate; ``logits[:, 0]`` is the reward.

    ``config`` is the backbone's own config (LlamaConfig, ...) plus a ``urm`` dict: attributes (the K
    names, in the value head's row order), members (M), value_bias, gate ("urm" | "softmax" | None),
    gate_hidden, gate_temperature, base_score (the backbone was a 1-label reward model whose head is
    kept as ``base_score``), base_score_bias.
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

    def __init__(self, config):
        super().__init__(config)
        urm = urm_settings(config)
        self.model = backbone_model(config)
        d, k = config.hidden_size, len(urm["attributes"])
        self.num_attributes = k
        self.score = nn.Linear(d, 2 * k, bias=urm["value_bias"])
        self.ensemble = ValueEnsemble(d, k, urm["members"], urm["value_bias"]) if urm["members"] > 1 else None
        hidden = urm["gate_hidden"]
        self.weights = mlp(d, hidden or d, k, 2, nn.SELU) if urm["gate"] == "urm" else None
        self.softmax_gate = (SoftmaxGate(d, k, hidden or 1024, urm["gate_temperature"])
                             if urm["gate"] == "softmax" else None)
        self.base_score = nn.Linear(d, 1, bias=urm["base_score_bias"]) if urm["base_score"] else None
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

    def gate_weights(self, h: torch.Tensor) -> torch.Tensor:
        """w(h) [B, K]: the gate's output, or 1/K each without a gate."""
        if self.weights is not None:
            return self.weights(h)
        if self.softmax_gate is not None:
            return self.softmax_gate(h)
        return h.new_full((h.shape[0], self.num_attributes), 1.0 / self.num_attributes)

    def heads(self, h: torch.Tensor) -> dict:
        """The reward heads on last-token hidden states h [B, d] (pipeline.heads.Heads.forward)."""
        h = h.to(self.score.weight.dtype)
        mu, log_sigma = split_mean_logstd(self.score(h))
        sigma = log_sigma.exp()
        w = self.gate_weights(h)
        out = {"logits": score(w, mu)[:, None], "score_std": score_variance(w, sigma).sqrt(),
               "attribute_means": mu, "attribute_stds": sigma, "gating_weights": w}
        if self.ensemble is not None:
            member_mu, _ = split_mean_logstd(self.ensemble(h))  # [M, B, K]
            out["ensemble_scores"] = score(w, member_mu).T  # [B, M]
            out["ensemble_std"] = out["ensemble_scores"].std(-1)
        return out

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
        out = self.heads(h)
        if self.base_score is not None:
            out["base_score"] = self.base_score(h.to(self.base_score.weight.dtype))[:, 0]
        output = URMOutput(**out)
        use_dict = return_dict if return_dict is not None else getattr(self.config, "return_dict", True)
        return output if use_dict else output.to_tuple()
