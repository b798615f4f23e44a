"""URMConfig: the backbone's own config class plus the reward heads' settings (the ``urm`` dict).

Self-contained (imports only transformers): `urm export` copies this file into every export and
writes the backbone's config class into the import line marked below (``LlamaConfig`` for Llama
backbones such as Skywork-Reward-Llama-3.1-8B and SmolLM2). Subclassing the backbone's config keeps
``model_type`` the backbone's own ("llama"): code that reads the config without
``trust_remote_code`` (the usage snippet's ``AutoTokenizer.from_pretrained``) gets the plain
backbone config, with no "run custom code?" prompt, while ``trust_remote_code=True`` loads this
class through ``auto_map["AutoConfig"]``.

``urm`` holds: attributes (the K names, in the value head's row order), members (M value heads),
value_bias, gate ("urm" | "softmax" | None), gate_hidden, gate_temperature, base_score (the
backbone was a 1-label reward model whose head is kept as ``base_score``), base_score_bias.
"""

from transformers import LlamaConfig as BackboneConfig  # urm-export: the backbone's config class


class URMConfig(BackboneConfig):
    """The backbone's config plus ``urm`` (the heads' shapes, written by `urm export`)."""

    def __init__(self, urm=None, **kwargs):
        super().__init__(**kwargs)
        self.urm = dict(urm) if urm else {}
