"""The export as a vLLM pooling model: vLLM's own Llama backbone, the heads of ``pipeline.model.heads`` on its
last-token state, the reward transform of ``pipeline.model.rewards`` chosen when the server starts.

Imported only by vLLM, through the plugin (``pipeline.serve.vllm_plugin``), which registers this class under
the export's architectures: ``URMForSequenceClassification`` and ``LlamaForSequenceClassificationWithNormal_Weights``
(the published URM layout, which `urm export` writes where SGLang's class computes the same score). Tested
with vLLM 0.32 (``make test-vllm``).

What it returns (one pooling task per vLLM instance, vLLM's rule):
  classify (the default: /classify, /pooling, ``LLM.classify``)   one class, the reward under the transform,
      with no activation whatever the request asks (a reward is not a probability): verl's reward loop reads
      it as ``data[-1]["probs"][-1]``.
  embed (``--pooler-config '{"task": "embed"}'``: /pooling, /v1/embeddings, ``LLM.embed``)   the whole answer
      as one vector per response, laid out by ``pipeline.serve.engine_answer`` (score, score_std, per-attribute
      means, stds and gate weights, the ensemble's std and members, the epistemic stds with a ridge posterior, the
      reward last), never normalised.

The transform: ``--hf-overrides '{"urm_reward": "lcb", "urm_risk": 1.0}'`` (mean | lcb | elcb | min | uwo, as
`urm score --reward`; default mean, risk 1). The heads run in float32 whatever the backbone's dtype (the
last-token state is upcast); the reward is computed in float64 by ``rewards.reward`` and returned as float32.

Refused at load, with one line saying why (never scored wrong): a backbone other than Llama, heads whose
tensors do not fit the backbone or the config (another hidden size, a gate of another width), a tensor of the
heads missing, an unknown transform or a bad risk, min/uwo without an ensemble, elcb without a ridge posterior,
a pooling type other than
the last token, and, for an export with ``urm_export.json``, a file whose checksum differs from the one
recorded (``--hf-overrides '{"urm_verify": false}'`` checks only the heads' own shard, as `urm score --no-verify`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.pooler import DispatchPooler, PoolingParamsUpdate
from vllm.model_executor.layers.pooler.activations import PoolerIdentity
from vllm.model_executor.layers.pooler.seqwise import LastPool, SequencePooler, SequencePoolerHead, pooler_for_classify
from vllm.model_executor.models.llama import LlamaModel
from vllm.model_executor.models.utils import AutoWeightsLoader, maybe_prefix

from pipeline.errors import UserError
from pipeline.model import (PUBLISHED_ARCHITECTURE, RISK_TRANSFORMS, TRANSFORMS, build_heads, head_outputs,
                            is_published_layout, published_settings, reward, risk_ok)
from pipeline.serve.engine_answer import answer_layout, answer_vectors
from pipeline.serve.scoring import ScoreError, check_export, check_hidden_size, reward_missing

# A child of vLLM's own logger: its lines appear with vLLM's, at VLLM_LOGGING_LEVEL (INFO by default)
logger = logging.getLogger("vllm.urm_plugin")

BACKBONES = ("llama",)  # backbone families whose vLLM implementation this class wraps (LlamaModel)
HEAD_PREFIXES = ("score.", "ensemble.", "weights.", "softmax_gate.", "base_score.", "posterior.")
UNNESTED_GATE = re.compile(r"^weights\.(\d+)\.")  # an export made before the gate was nested as published


def served_settings(config) -> dict:
    """The ``urm`` settings of the config vLLM read (an export's section, or those of a checkpoint in the
    published layout); ScoreError when it has neither or its backbone is not one vLLM's Llama computes."""
    urm = getattr(config, "urm", None)
    if isinstance(urm, dict) and urm.get("attributes"):
        settings = {**urm}
        settings.setdefault("backbone_model_type", config.model_type)  # an export made before it was written
    elif is_published_layout(config.to_dict()):
        settings = published_settings(config.to_dict())
    else:
        raise ScoreError("this config.json has no 'urm' section: not a model made by `urm export` (nor a checkpoint "
                         f"in the published URM layout, {PUBLISHED_ARCHITECTURE}); serve an export of `urm export`")
    family = settings["backbone_model_type"]
    if family not in BACKBONES:
        raise ScoreError(f"the export's backbone is a {family!r} model, and the vLLM plugin computes Llama backbones "
                         f"only ({', '.join(BACKBONES)}); score it with `urm score` / `urm serve` instead")
    return settings


def reward_setting(config, members: int, posterior: bool = False) -> tuple[str, float]:
    """The transform and risk from ``--hf-overrides`` (``urm_reward``, ``urm_risk``); ScoreError when unknown,
    not a finite number 0 or more, or needing an ensemble (or a ridge posterior) the export lacks."""
    transform, risk = getattr(config, "urm_reward", "mean"), getattr(config, "urm_risk", 1.0)
    if transform not in TRANSFORMS:
        raise ScoreError(f"--hf-overrides urm_reward {transform!r} is not a reward transform; use one of "
                         f"{', '.join(TRANSFORMS)}")
    if isinstance(risk, int) and not isinstance(risk, bool):
        risk = float(risk)
    if not risk_ok(risk):
        raise ScoreError(f"--hf-overrides urm_risk {risk!r} is not a finite number, 0 or more")
    why = reward_missing(transform, members, posterior)
    if why:
        raise ScoreError(f"--hf-overrides urm_{why}")
    return transform, risk


def check_pooling(pooler_config) -> None:
    """The heads read the last token of the whole sequence: any other pooling is refused."""
    kind = getattr(pooler_config, "seq_pooling_type", None)
    if kind not in (None, "LAST"):
        raise ScoreError(f"--pooler-config seq_pooling_type {kind!r}: the reward heads read the last token; "
                         "leave it unset (LAST)")
    if getattr(pooler_config, "enable_chunked_processing", False):
        raise ScoreError("--pooler-config enable_chunked_processing: the reward heads read the last token of the "
                         "whole conversation, not of a chunk; leave it off (and raise --max-model-len instead)")


def check_files(model: str, config, verify: bool) -> None:
    """An export's files against its records, as `urm score` checks them, and its heads' width against the
    backbone's (a local folder with urm_export.json only: a published checkpoint or a hub id has none)."""
    path = Path(model)
    if not (path / "urm_export.json").is_file():
        logger.info("URM plugin: %s has no urm_export.json, so no checksums to check its files against", model)
        return
    check_hidden_size(path, config, check_export(path, verify))


class LastTokenPool(LastPool):
    """vLLM's last-token pooling, watching for input that starts with two BOS tokens.

    `urm score` and the exported model read ``[BOS, BOS, x...]`` as ``[BOS, x...]`` (docs/method.md 5: templated text
    tokenised again adds a second BOS on Llama 3); vLLM has computed the backbone over both by the time the pooler
    runs, so such a row is scored as given, and a warning says so (at the 1st, 10th, 100th, ... such row)."""

    def __init__(self, bos: int | None):
        super().__init__()
        self.bos, self.doubled, self.next_warning = bos, 0, 1

    def get_pooling_updates(self, task):
        return PoolingParamsUpdate(requires_token_ids=self.bos is not None)

    def forward(self, hidden_states, pooling_metadata):
        ids = pooling_metadata.prompt_token_ids_cpu
        if self.bos is not None and ids is not None and ids.shape[1] >= 2:
            cursor = pooling_metadata.get_pooling_cursor()
            finished = torch.as_tensor(cursor.get_finished_mask(), dtype=torch.bool)
            doubled = (ids[:, 0] == self.bos) & (ids[:, 1] == self.bos) & (pooling_metadata.prompt_lens >= 2)
            self.count(int((doubled & finished).sum()))
        return super().forward(hidden_states, pooling_metadata)

    def count(self, new: int) -> None:
        self.doubled += new
        if self.doubled >= self.next_warning:
            while self.next_warning <= self.doubled:
                self.next_warning *= 10
            logger.warning("URM plugin: %d request(s) so far began with two BOS tokens (id %d), scored as given, "
                           "which is not what `urm score` gives (one BOS); send the chat template's text without its "
                           "BOS where the tokenizer adds one (verl does), or messages, or token ids", self.doubled,
                           self.bos)


class AnswerHead(SequencePoolerHead):
    """The embed task's head: the last-token states -> the whole answer vector per response."""

    def __init__(self, model: "URMForVLLM"):
        super().__init__()
        self.answer = model.answer

    def get_supported_tasks(self):
        return {"embed"}

    def forward(self, pooled_data, pooling_metadata):
        h = torch.stack(pooled_data) if isinstance(pooled_data, list) else pooled_data
        return self.answer(h)


class URMForVLLM(nn.Module):
    """vLLM's ``LlamaModel`` (``model.*``) + the URM heads (``score``, ``ensemble``, ``weights`` or
    ``softmax_gate``, ``base_score``) in float32 + a pooler giving the reward (classify) or the whole answer (embed)."""

    is_pooling_model = True
    default_seq_pooling_type = "LAST"
    hf_to_vllm_mapper = LlamaModel.hf_to_vllm_mapper
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        model_config = vllm_config.model_config
        config = model_config.hf_config
        where = model_config.model
        try:
            self.settings = served_settings(config)
            self.transform, self.risk = reward_setting(config, int(self.settings["members"]),
                                                       bool(self.settings.get("posterior")))
            check_pooling(model_config.pooler_config)
            if self.settings.get("layout") != "published":
                check_files(where, config, getattr(config, "urm_verify", True) is not False)
        except UserError as e:  # ScoreError, and the export's own (ExportError, HeadsError): one class, one line
            raise ScoreError(str(e) if str(where) in str(e) else f"{where}: {e}") from None
        self.config, self.source = config, where
        self.attributes = list(self.settings["attributes"])
        self.model = LlamaModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        s, d = self.settings, config.hidden_size
        build_heads(self, d, len(self.attributes), s["members"], s["value_bias"], s["gate"], s["gate_hidden"],
                    s["gate_temperature"], s.get("posterior"))
        self.base_score = nn.Linear(d, 1, bias=s["base_score_bias"]) if s["base_score"] else None
        self.head_names = [n for n in ("score", "ensemble", "weights", "softmax_gate", "base_score", "posterior")
                           if getattr(self, n) is not None]
        for name in self.head_names:  # float32 whatever the backbone's dtype (vLLM built them in it)
            setattr(self, name, getattr(self, name).to(torch.float32))
        self.layout = answer_layout(self.attributes, s["members"], s["base_score"], bool(s.get("posterior")))
        self.pooler = self.make_pooler(vllm_config)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        self.describe(where, model_config)

    def make_pooler(self, vllm_config: VllmConfig) -> DispatchPooler:
        """classify always; embed (the whole answer) when the instance was started for it (vLLM serves one
        pooling task per instance, embed before classify when a model has both, so classify stays the default)."""
        pooler_config = vllm_config.model_config.pooler_config
        pool = LastTokenPool(getattr(self.config, "bos_token_id", None))
        poolers = {"classify": pooler_for_classify(pooler_config, pooling=pool, classifier=self.rewards,
                                                   act_fn=PoolerIdentity())}
        if getattr(pooler_config, "task", None) == "embed":
            poolers["embed"] = SequencePooler(pooling=pool, head=AnswerHead(self))
        return DispatchPooler(poolers)

    def describe(self, where: str, model_config) -> None:
        s = self.settings
        risk = f" (risk {self.risk})" if self.transform in RISK_TRANSFORMS else ""
        logger.info("URM plugin: %s, %d attributes, %d value head(s), gate %s, reward %s%s; heads in float32, "
                    "backbone in %s", where, len(self.attributes), s["members"], s["gate"], self.transform, risk,
                    str(model_config.dtype).removeprefix("torch."))
        if s.get("layout") == "published" or not s.get("sigma_calibrated", True):
            logger.warning("URM plugin: %s: its sigma was never calibrated on held-out data (score_std, "
                           "attribute_stds and the lcb reward are as the checkpoint gives them)", where)
        trained = s.get("max_length")
        if trained and model_config.max_model_len > trained:
            logger.warning("URM plugin: the heads were trained on conversations of at most %d tokens and this "
                           "server takes %d; `--max-model-len %d` refuses longer ones, as `urm serve` does",
                           trained, model_config.max_model_len, trained)

    # ------------------------------------------------------------------------------------------
    # The computation

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors=None,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone's final-norm hidden states of every scheduled token; the pooler reads each last one."""
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def outputs(self, h: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """Last-token states [B, d] -> (the heads' outputs, float32; the reward [B], float64 on the CPU)."""
        h = h.to(torch.float32)
        out = head_outputs(self, h)
        if self.base_score is not None:
            out["base_score"] = self.base_score(h)[:, 0]
        given = reward(self.transform, self.risk, out["score"].detach().cpu(), out["score_std"].detach().cpu(),
                       None if out.get("ensemble_scores") is None else out["ensemble_scores"].detach().cpu(),
                       None if out.get("epistemic_std") is None else out["epistemic_std"].detach().cpu())
        return out, torch.from_numpy(given)

    def rewards(self, h: torch.Tensor) -> torch.Tensor:
        """The classify head: [B, d] -> [B, 1], the reward (one class)."""
        _, given = self.outputs(h)
        return given.to(device=h.device, dtype=torch.float32)[:, None]

    def answer(self, h: torch.Tensor) -> torch.Tensor:
        """The embed head: [B, d] -> [B, N], the whole answer (``pipeline.serve.engine_answer``)."""
        out, given = self.outputs(h)
        return answer_vectors(out, given)

    # ------------------------------------------------------------------------------------------
    # Weights

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The backbone through vLLM's loader (its fused q/k/v and gate/up), the heads here: each head tensor
        checked against its parameter's shape, every head parameter required, so a checkpoint whose heads do
        not fit is refused with one line instead of being scored with a random or truncated head."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def backbone(items):
            for name, tensor in items:
                name = UNNESTED_GATE.sub(r"weights.fc.\1.", name)
                if not name.startswith(HEAD_PREFIXES):
                    yield name, tensor
                    continue
                param = params.get(name)
                if param is None:
                    raise ScoreError(f"{self.where()}: the checkpoint holds {name} {list(tensor.shape)}, a tensor the "
                                     f"heads in config.json do not have ({self.shape_hint()}): heads and config "
                                     "disagree; export it again with `urm export`")
                if tuple(param.shape) != tuple(tensor.shape):
                    raise ScoreError(f"{self.where()}: {name} is {list(tensor.shape)} in the checkpoint but the "
                                     f"config's heads take {list(param.shape)} ({self.shape_hint()}): heads of "
                                     "another shape than the config says; export it again with `urm export`")
                with torch.no_grad():
                    param.copy_(tensor.to(param.dtype))
                loaded.add(name)

        loader = AutoWeightsLoader(self, ignore_unexpected_prefixes=["lm_head."])
        loaded |= loader.load_weights(backbone(weights))
        missing = sorted(n for n in params if n.startswith(HEAD_PREFIXES) and n not in loaded)
        if missing:
            raise ScoreError(f"{self.where()}: the checkpoint lacks {', '.join(missing[:3])} of the heads: it is not "
                             "a whole export; export it again with `urm export`")
        return loaded

    def where(self) -> str:
        return self.source

    def shape_hint(self) -> str:
        s = self.settings
        return (f"hidden size {self.config.hidden_size}, {len(self.attributes)} attributes, {s['members']} value "
                f"head(s), gate {s['gate']} of width {s['gate_hidden']}")
