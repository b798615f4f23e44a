"""URMConfig: the backbone's own config class plus the reward heads' settings (the ``urm`` dict).

Self-contained (imports only transformers): `urm export` copies this file into every export and
writes the backbone's config class into the import line marked below (``LlamaConfig`` for Llama
backbones such as Skywork-Reward-Llama-3.1-8B and SmolLM2). Every field of the backbone's config
is kept, but ``model_type`` is "urm", a type transformers does not know: without
``trust_remote_code`` ``AutoConfig`` / ``AutoModelForSequenceClassification`` stop with transformers'
"pass trust_remote_code=True" error instead of building a plain ``LlamaForSequenceClassification``
that would read the [2K, d] value head as 2K logits and return the first attribute's mean as the
reward. ``trust_remote_code=True`` loads this class through ``auto_map["AutoConfig"]`` (SGLang's
``--trust-remote-code`` too). The backbone's own type is ``urm["backbone_model_type"]``. Tokenizers
load without it (``tokenizer_config.json`` names the tokenizer class).

``urm`` holds: attributes (the K names, in the value head's row order), members (M value heads),
value_bias, gate ("urm" | "softmax" | None), gate_hidden, gate_temperature, base_score (the
backbone was a 1-label reward model whose head is kept as ``base_score``), base_score_bias,
backbone_model_type, sigma_calibrated, posterior (the ridge posterior's shapes per label group, or None).
"""

from transformers import LlamaConfig as BackboneConfig  # urm-export: the backbone's config class


class URMConfig(BackboneConfig):
    """The backbone's config plus ``urm`` (the heads' shapes, written by `urm export`)."""

    model_type = "urm"

    def __init__(self, urm=None, **kwargs):
        super().__init__(**kwargs)
        self.urm = dict(urm) if urm else {}
