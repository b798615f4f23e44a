"""`urm export`'s config: which heads, onto which backbone, into which folder."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.configs.options import opt
from pipeline.configs.paths import DEFAULT_PATHS


@dataclass
class ExportConfig:
    """`urm export`: stitch the heads onto the backbone as a Hugging Face model directory."""

    backbone: str | None = opt(None, "Backbone to export onto (default: the one the heads' cache was "
                               "extracted with, from heads.json); see `urm extract --help`.")
    revision: str | None = opt(None, "Hub revision of the backbone.")
    heads_dir: str = opt(DEFAULT_PATHS["heads_dir"], "Trained heads folder.", shown="runs/PRESET/heads")
    out_dir: str = opt(DEFAULT_PATHS["out_dir"], "Where the exported model directory goes.", shown="runs/PRESET/model")
    overwrite: bool = opt(False, "Replace an existing export.")
    link: bool = opt(True, "Hardlink the backbone's shard files into the export (no bytes copied; do not then "
                     "modify the export in place); --no-link copies them.")
