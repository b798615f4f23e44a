"""Configs: one typed config per stage (plain data: every option's name, default, help and valid values) and
the presets that fill them, shipped beside them as TOML (``pipeline/configs/*.toml``).

  options   the option system: fields with help, groups, the flat view, the value checks, ``ConfigError``
  paths     where a preset's artifacts go (cache/NAME, runs/NAME/...)
  extract   ``DatasetSpec``, ``ExtractConfig``
  train     ``Optimization``, ``TrainingRun``, ``ValueHeadConfig``, ``GatingConfig``
  export    ``ExportConfig``
  evaluate  ``EvaluateConfig``
  runtime   the groups score, curate and serve share: ``Runtime`` (device, dtype, verify, token budget),
            ``Reading`` (format, skip-invalid, limit, max length)
  serve     ``ScoreConfig``, ``ServeConfig``
  curate    ``CurateConfig``
  presets   ``STAGES``, reading and checking a preset, ``load_config``

Configs are what the command line reads before anything else, so importing them imports no stage
(no torch): a value is checked against the choices a stage owns (the losses, the gates, the data
formats, the cache kinds and storage dtypes, the attention kernels and engines, the curation signals, the
reward transforms) by importing that stage when a config is built; no list of choices is copied here. The
stages never import configs, not even for types (they take a config as an argument and read its fields): the
import goes one way only.
"""

from pipeline.configs.curate import CurateConfig
from pipeline.configs.evaluate import EvaluateConfig
from pipeline.configs.export import ExportConfig
from pipeline.configs.extract import SMOLLM2_GGUF, DatasetSpec, ExtractConfig
from pipeline.configs.options import VERIFY_HELP, ConfigError, build, options, to_dict
from pipeline.configs.paths import DEFAULT_PRESET
from pipeline.configs.presets import STAGES, check_preset, load_config, preset_names
from pipeline.configs.serve import ScoreConfig, ServeConfig
from pipeline.configs.train import GatingConfig, TrainingRun, ValueHeadConfig

__all__ = [
    "build", "check_preset", "ConfigError", "CurateConfig", "DatasetSpec", "DEFAULT_PRESET", "EvaluateConfig",
    "ExportConfig", "ExtractConfig", "GatingConfig", "load_config", "options", "preset_names", "ScoreConfig",
    "ServeConfig", "SMOLLM2_GGUF", "STAGES", "to_dict", "TrainingRun", "ValueHeadConfig", "VERIFY_HELP",
]
