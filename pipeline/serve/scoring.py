"""Scoring with an exported model: its outputs for token id lists, and as JSON-ready rows.

``score_ids`` runs rows through the exported model in token-budget batches (pipeline.features.batching) and
returns the heads' outputs under their one set of names (``pipeline.model.heads.OUTPUTS``, plus
``base_score`` when the backbone was a reward model); ``row_scores`` turns one row of them into a
JSON object (per-attribute values keyed by attribute name) and ``pair_probabilities`` adds
P(chosen > rejected) under Bradley-Terry and under the Gaussians (docs/method.md 1).
"""

from __future__ import annotations

import logging
import math

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import UserError
from pipeline.features import OnBatch, run_batches
from pipeline.model import OUTPUTS, needs_ensemble, needs_posterior, p_chosen_bt, p_chosen_gaussian

logger = logging.getLogger(__name__)

# [B, K]: keyed by attribute name
PER_ATTRIBUTE = ("attribute_means", "attribute_stds", "gating_weights", "attribute_epistemic_stds")
# An export made before the URM gate's tensors were nested as published (weights.{0,2,4}.*, not weights.fc.*)
UNNESTED_GATE = {r"^weights\.(\d+)\.": r"weights.fc.\1."}


class ScoreError(UserError):
    """The model directory or the input cannot be scored."""


def export_config(model_dir: str):
    """The export's config.json (``URMConfig``, with its ``urm`` section), or ScoreError saying why not; reads
    no weights, so a command can check what the export can give before loading it."""
    from pipeline.model import PUBLISHED_ARCHITECTURE, checkpoint_settings
    from pipeline.model.configuration_urm import URMConfig

    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise ScoreError(f"{path}: no config.json, so not a model directory; export one with `urm export`")
    try:
        config_dict, _ = URMConfig.get_config_dict(path)
        config_dict.pop("model_type", None)  # "llama" in a published checkpoint or an older export: no warning
        config = URMConfig.from_dict(config_dict)
    except Exception as e:  # transformers raises OSError, ValueError or a JSON error for a damaged config
        raise ScoreError(f"{path / 'config.json'}: unreadable ({type(e).__name__}: {e}); export it again with "
                         "`urm export`") from None
    config.urm = checkpoint_settings(path)  # an export's section, or a published-layout checkpoint's
    if not config.urm:
        raise ScoreError(f"{path / 'config.json'}: no 'urm' section, so not a model exported by `urm export` (nor "
                         f"a checkpoint in the published URM layout, {PUBLISHED_ARCHITECTURE})")
    return config


def reward_missing(transform: str, members: int, posterior: bool = False) -> str | None:
    """Why this model cannot give ``transform`` (min and uwo need an ensemble, elcb a ridge posterior), or None."""
    if needs_ensemble(transform) and members < 2:
        return (f"reward {transform!r} needs an ensemble, and this export has {members} value head; use mean or "
                "lcb, or train with --ensemble 2 or more and export again")
    if needs_posterior(transform) and not posterior:
        return (f"reward {transform!r} needs the heads' ridge posterior (epistemic_std), and this export has none "
                "(heads trained with an AdamW loss, or exported before it was kept); use mean or lcb, or train "
                "with --loss ridge (the default) and export again")
    return None


def check_reward_fits(model_dir: str, transform: str) -> None:
    """Before loading: ScoreError when ``transform`` needs what the export lacks (--reward min / uwo: an ensemble;
    elcb: a ridge posterior)."""
    urm = export_config(model_dir).urm
    why = reward_missing(transform, int(urm.get("members", 1)), bool(urm.get("posterior")))
    if why:
        raise ScoreError(f"--{why}")


def load_scorer(model_dir: str, dtype: str = "auto", device: str = "auto", verify: bool = True):
    """An exported model (pipeline's own copy of modeling_urm: no remote code runs) and its tokenizer;
    its files are checked against the checksums the export recorded (``verify``; the heads' always). A
    checkpoint in the published layout has no heads.json to check against.

    The weights load straight into the compute dtype (``pipeline.device.load_in_dtype``: no second full copy);
    ``auto`` is bf16 where the hardware runs it natively (``pipeline.device.scoring_dtype``), and where it resolves
    to fp32 on a CPU, a note says first how much memory that takes and that --dtype bfloat16 halves it."""
    from transformers import AutoTokenizer

    from pipeline.device import load_in_dtype, resolve_device, resolve_dtype, scoring_dtype, stored_parameters
    from pipeline.model.modeling_urm import URMForSequenceClassification

    path = Path(model_dir)
    config = export_config(model_dir)
    if config.urm.get("layout") != "published":
        check_hidden_size(path, config, check_export(path, verify))
    check_weights(path, config)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(scoring_dtype(dtype), dev)
    if dtype in ("auto", "auto-bf16") and dev.type == "cpu" and torch_dtype == torch.float32:
        _, count = stored_parameters(path)
        logger.info(f"note: this CPU has no native bf16, so --dtype {dtype} scores in float32: the weights take about "
                    f"{count * 4 / 1e9:.1f} GB of memory; --dtype bfloat16 halves that (bf16 is emulated here, so "
                    "slower)")
    keep = tuple(f"{name}." for name in URMForSequenceClassification.HEAD_MODULES)  # the heads stay fp32
    try:
        model = load_in_dtype(lambda dt: URMForSequenceClassification.from_pretrained(
            path, config=config, dtype=dt, key_mapping=UNNESTED_GATE), path, torch_dtype, keep)
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)  # given: no model_type urm lookup, no prompt
    except Exception as e:  # truncated or missing shards, a damaged tokenizer
        raise ScoreError(f"{path}: the export cannot be loaded ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         "export it again with `urm export`") from None
    if bad := nonfinite_parameter(model):
        raise ScoreError(f"{path}: its weight {bad} holds NaN or infinite values, so every score would be "
                         "meaningless; restore the checkpoint's files, or export it again")
    return model.to(dev).eval(), tokenizer


def check_weights(path: Path, config) -> None:
    """Before the weights load: every tensor the model class needs for this config is in the files with its shape,
    and the heads' tensors are finite (``pipeline.model.check_checkpoint_tensors``); the class is built on the meta
    device for the names and shapes, so nothing is allocated."""
    from pipeline.model import check_checkpoint_tensors
    from pipeline.model.modeling_urm import URMForSequenceClassification

    try:
        with torch.device("meta"):
            wanted = {name: tuple(t.shape) for name, t in URMForSequenceClassification(config).state_dict().items()}
    except Exception as e:  # a config.json whose values no model can be built from
        raise ScoreError(f"{path / 'config.json'}: no model can be built from it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); export it again with `urm export`") from None
    check_checkpoint_tensors(path, wanted, UNNESTED_GATE, finite=lambda name: not name.startswith("model."))


def nonfinite_parameter(model, chunk: int = 1 << 22) -> str | None:
    """The name of the first parameter holding a NaN or an infinity, or None. Checked ``chunk`` elements at a time
    (a float32 sum per chunk; an overflowing sum is then checked element by element), so the check holds at most
    16 MB more than the weights: a float32 copy of a whole bf16 embedding (an 8B's: 2 GB) would not fit the
    memory the weights were loaded to fit."""
    for name, p in model.named_parameters():
        for part in p.detach().reshape(-1).split(chunk):
            if not torch.isfinite(part.float().sum()) and not bool(part.isfinite().all()):
                return name
    return None


def nonfinite_field(value, name: str = "") -> tuple[str, float] | tuple[None, None]:
    """(the dotted name, the value) of the first NaN or infinity in a row (nested dicts and lists), or (None, None)."""
    if isinstance(value, float) and not math.isfinite(value):
        return name, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, v in items:
        found = nonfinite_field(v, f"{name}.{key}" if name else str(key))
        if found[0] is not None:
            return found
    return None, None


def check_export(path: Path, verify: bool):
    """Before loading an export: its heads shard against heads.json's checksum (always: it is the heads' own
    file), then every file against urm_export.json's checksums (``verify``; else only that each is there).
    Returns the heads' ``HeadsMeta``."""
    from pipeline.export import check_export_files
    from pipeline.model import EXPORT_TENSORS, check_tensors, read_meta

    meta = read_meta(path, tensors=EXPORT_TENSORS)
    check_tensors(path, meta, EXPORT_TENSORS)
    check_export_files(path, verify)
    return meta


def check_hidden_size(path: Path, config, meta) -> None:
    """ScoreError when the heads were fitted on features of another width than this backbone's hidden size
    (heads from another backbone; under --no-verify nothing else would catch it before the weights load)."""
    from safetensors import SafetensorError, safe_open

    from pipeline.model import EXPORT_TENSORS

    want = getattr(config, "hidden_size", None)
    try:
        with safe_open(str(path / EXPORT_TENSORS), "pt") as f:
            names = set(f.keys())
            found = f.get_slice("score.weight").get_shape()[-1] if "score.weight" in names else meta.hidden_size
    except (SafetensorError, OSError, ValueError):  # an unreadable shard: the load that follows names it
        found = meta.hidden_size
    for width, where in ((meta.hidden_size, "heads.json"), (found, EXPORT_TENSORS)):
        if want is not None and width != want:
            raise ScoreError(f"{path / where}: the heads take features of hidden size {width}, but the backbone in "
                             f"{path / 'config.json'} has hidden size {want}: they were trained on another backbone's "
                             "features; export them onto that backbone (`urm export --backbone ...`)")


def model_forward(model, input_ids: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """One padded batch through the exported model: the heads' outputs by name (score = logits[:, 0])."""
    out = model(input_ids=input_ids.to(model.device), attention_mask=mask.to(model.device))
    rest = (name for name in OUTPUTS[1:] + ("base_score",) if out.get(name) is not None)
    return {"score": out.logits[:, 0], **{name: out[name] for name in rest}}


def score_ids(model, id_lists: list[list[int]], max_tokens: int, pad_id: int,
              on_batch: OnBatch | None = None) -> dict[str, np.ndarray]:
    """Score rows in token-budget batches (longest first); results come back in the input order."""
    return run_batches(lambda ids, mask: model_forward(model, ids, mask), id_lists, max_tokens, pad_id, on_batch)


def length_limit(config, asked: int | None) -> int:
    """The longest conversation to score: as asked, else the longest the heads were trained on (the export's
    ``urm.max_length``), never more than the backbone's positions: a ``--max-length`` above them is refused
    (ScoreError), as the model cannot take such rows."""
    positions = positions_of(config)
    if asked and asked > positions:
        raise ScoreError(f"--max-length {asked} is more than the backbone's {positions} positions "
                         f"(max_position_embeddings in config.json): give --max-length {positions} or less")
    trained = (getattr(config, "urm", None) or {}).get("max_length")
    return min(asked or trained or positions, positions)


def positions_of(config) -> int:
    """The backbone's positions (``max_position_embeddings``; unbounded when the config names none)."""
    positions = getattr(config, "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else 1 << 62


def length_hint(config, limit: int) -> str:
    """What a person can do about rows longer than ``limit``: true whether or not the limit is the backbone's."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or positions <= 0:
        return "--max-length raises the limit"
    if limit >= positions:
        return f"the backbone takes at most {positions} positions, so no --max-length lets them in"
    return f"--max-length up to {positions} (the backbone's positions) raises the limit"


def row_scores(out: dict[str, np.ndarray], i: int, names: list[str]) -> dict:
    """The JSON fields of row ``i``: every output, per-attribute ones keyed by attribute name."""
    row = {}
    for name, values in out.items():
        if name in PER_ATTRIBUTE:
            row[name] = dict(zip(names, values[i].tolist()))
        else:
            row[name] = values[i].tolist() if values.ndim > 1 else float(values[i])
    return row


def pair_probabilities(chosen: dict, rejected: dict, temperature: dict | None = None) -> dict:
    """P(chosen > rejected) under Bradley-Terry and under the Gaussian scores (docs/method.md 1), at the
    export's temperatures (``{"bt": T, "gaussian": T}``, fitted on validation pairs)."""
    t = temperature or {"bt": 1.0, "gaussian": 1.0}
    s_c, s_r = torch.tensor(chosen["score"], dtype=torch.float64), torch.tensor(rejected["score"], dtype=torch.float64)
    var_c = torch.tensor(chosen["score_std"], dtype=torch.float64).square()
    var_r = torch.tensor(rejected["score_std"], dtype=torch.float64).square()
    return {"p_chosen_bt": p_chosen_bt(s_c, s_r, t["bt"]).item(),
            "p_chosen_gaussian": p_chosen_gaussian(s_c, s_r, var_c, var_r, t["gaussian"]).item()}
