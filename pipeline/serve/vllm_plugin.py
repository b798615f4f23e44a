"""The vLLM plugin: registers the export's architectures with vLLM, so that `vllm serve EXPORT --runner pooling
--trust-remote-code` serves the reward with its uncertainty (``pipeline.serve.vllm_model``).

vLLM calls ``register`` in each of its processes through the ``vllm.general_plugins`` entry point (pyproject.toml;
``VLLM_PLUGINS=urm`` picks it alone). Nothing in ``pipeline`` imports this module, and it imports no model code:
the class is named as ``module:Class``, which vLLM imports only where it builds the model.
"""

from __future__ import annotations

MODEL_CLASS = "pipeline.serve.vllm_model:URMForVLLM"
# config.json's ``architectures`` in an export: SGLang's class where it computes the same score, else ours
# (pipeline.export.model_dir.write_config)
ARCHITECTURES = ("URMForSequenceClassification", "LlamaForSequenceClassificationWithNormal_Weights")


def register() -> None:
    """Register the export's architectures (re-entrant: vLLM may call it more than once per process)."""
    from vllm import ModelRegistry

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, MODEL_CLASS)
