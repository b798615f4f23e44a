"""The heads folder: ``heads.safetensors`` (tensors under their export names) + ``heads.json`` (``HeadsMeta``).

``HeadsMeta`` is the one description of heads.json: the format version, the hidden size, the
attribute names, the ``architecture`` (the keyword arguments of ``heads.Heads``), the label
scaling, one ``StageRecord`` per trained stage (``value_head``, ``gating``) with its resolved
config, the identity of the cache it was trained on (``CacheIdentity``), its per-epoch history and
final validation metrics, how the stated uncertainty was calibrated (``SigmaCalibration``,
``PairCalibration``, with the validation metrics before and after), and the checksum of the tensors
file, verified on every load. Training writes it; export, the model card, scoring and the tests read it
through these types.

Whole or not at all: a save writes both files under their temporary names (``pipeline.atomic``), the new
heads.json holding the new tensors' checksum, then renames the tensors into place, then heads.json. A
process killed between the two renames leaves the new tensors beside the old heads.json and the new one
still under its temporary name; readers take the last complete pair (``meta_file``: the heads.json whose
checksum is the tensors'), so every load finds the old heads or the new ones, and the next writer renames
that heads.json into place and removes what a killed save left (``recover_heads``). Killed earlier, the old
pair is untouched. Other files in the folder are never touched.

One writer per folder (``heads_writer``): training holds the folder's lock (``pipeline.locks.hold_folder``)
from before it reads anything until its save, and a second training into the same folder is refused at
once, naming the holder's pid. Readers that only load take no lock (they take the last complete pair); a reader
that copies the pair elsewhere, `urm export`, holds the shared lock (``heads_reader``: refused while a training
writes, and a training is refused while it copies) and checks its copy against the heads.json it copied
(``copy_heads``), so an export never holds one stage's tensors beside another's description.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from pipeline.atomic import fsync_folder, json_text, named_for, parse_temp, remove_stale_temps, write_temp
from pipeline.locks import FolderBusy, hold_folder
from pipeline.errors import UserError
from pipeline.hashing import file_xxh3
from pipeline.model.heads import Heads

FORMAT_VERSION = 1
TENSORS = "heads.safetensors"
EXPORT_TENSORS = "urm-heads.safetensors"  # the same file in an export (the tensor names are the export's)
META = "heads.json"
LABEL_SCALING_NOTE = (
    "The saved weights predict on the label scale (0-4). With standardized labels the head was "
    "trained on (y - mean) / std and then folded back: mu rows of score.weight scaled by std, "
    "score.bias mu entries = std * b_mu + mean, log-sigma entries + log(std) "
    "(pipeline.model.heads.unstandardize).")


class HeadsError(UserError):
    """A heads folder that is missing, unreadable or does not fit what is asked of it."""


@dataclass
class CacheIdentity:
    """What identifies the cache a stage was trained on: where, its content, and what made it."""

    path: str
    fingerprint: str | None = None
    backbone: str | None = None
    backbone_revision: str | None = None
    chat_template_hash: str | None = None
    hidden_size: int | None = None
    max_length: int | None = None  # the longest conversation (tokens) its rows could have

    # Two caches whose features come from different backbones or renderings cannot feed one model.
    FEATURE_FIELDS = ("backbone", "backbone_revision", "chat_template_hash", "hidden_size")

    @classmethod
    def of(cls, path, manifest: dict) -> "CacheIdentity":
        """The identity of the cache at ``path`` from its manifest."""
        return cls(str(path), manifest.get("fingerprint"), **{k: manifest.get(k) for k in cls.FEATURE_FIELDS},
                   max_length=manifest.get("max_length"))

    def feature_differences(self, other: "CacheIdentity") -> list[str]:
        """The fields that say the two caches' features were made differently."""
        return [k for k in self.FEATURE_FIELDS if getattr(self, k) != getattr(other, k)]


@dataclass
class LabelScaling:
    """Per-attribute mean and std the labels were standardised with (folded back into the weights)."""

    standardized: bool
    mean: list[float]
    std: list[float]
    note: str = LABEL_SCALING_NOTE


@dataclass
class StageRecord:
    """One trained stage: its resolved config, the cache it read, per-epoch history, final metrics."""

    config: dict
    cache: CacheIdentity
    epochs_run: int = 0
    best_epoch: list[int] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)
    val: dict = field(default_factory=dict)  # metric name -> value; "per_attribute" -> name -> metrics
    selection: dict = field(default_factory=dict)  # what the stage chose automatically, and the numbers that chose it


@dataclass
class SigmaCalibration:
    """How the value head's sigma was obtained, and its interval metrics on the validation split
    before and after (coverage50 / coverage90 / nll / mean_sigma, overall and per attribute)."""

    method: str  # "calibrated" (log-sigma rows refit on a held-out split) | "as trained"
    loss: str  # the stage-1 loss that trained the means (and sigma before calibration)
    calibration_rows: int
    before: dict
    after: dict
    fitted: dict = field(default_factory=dict)  # "score" / "ensemble": the (a, b) per member and attribute


@dataclass
class PairCalibration:
    """The temperatures of P(chosen > rejected), fitted on validation pairs, and the calibration metrics
    there before (T = 1) and after (ece, brier, ece_gaussian, brier_gaussian)."""

    temperature_bt: float
    temperature_gaussian: float
    validation_pairs: int
    before: dict
    after: dict


@dataclass
class HeadsMeta:
    """heads.json. ``architecture`` is what ``Heads(hidden_size, len(attributes), **architecture)``
    takes (members, bias, gate, gate_hidden, temperature); a stage not trained yet is None."""

    attributes: list[str]
    hidden_size: int
    architecture: dict
    value_head: StageRecord
    label_scaling: LabelScaling | None = None
    gating: StageRecord | None = None
    sigma_calibration: SigmaCalibration | None = None
    pair_calibration: PairCalibration | None = None
    checksum: str | None = None  # xxh3-128 of heads.safetensors, verified on every load
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict, where: Path) -> "HeadsMeta":
        """Parse heads.json; HeadsError naming the file and the key for anything missing or wrong."""
        if not isinstance(data, dict):
            raise HeadsError(f"{where}: a JSON {type(data).__name__}, not the object heads.json holds; retrain the heads")
        if data.get("format_version") != FORMAT_VERSION:
            raise HeadsError(f"{where}: format_version {data.get('format_version')} (this code reads "
                             f"{FORMAT_VERSION}); retrain the heads with this version")
        for key, ok, what in (("attributes", lambda v: isinstance(v, list) and v and all(isinstance(x, str) for x in v),
                               "a non-empty list of names"),
                              ("hidden_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0,
                               "a positive whole number"),
                              ("architecture", lambda v: isinstance(v, dict), "an object"),
                              ("value_head", lambda v: isinstance(v, dict), "an object")):
            if key not in data:
                raise HeadsError(f"{where}: no {key!r}: not a heads.json this version reads; retrain the heads")
            if not ok(data[key]):
                raise HeadsError(f"{where}: {key!r} must be {what}, got {data[key]!r}; retrain the heads")
        try:
            scaling, sigma, pairs = (data.get(k) for k in ("label_scaling", "sigma_calibration", "pair_calibration"))
            return cls(attributes=list(data["attributes"]), hidden_size=int(data["hidden_size"]),
                       architecture=dict(data["architecture"]), value_head=_stage(data["value_head"]),
                       label_scaling=LabelScaling(**scaling) if scaling else None,
                       gating=_stage(data["gating"]) if data.get("gating") else None,
                       sigma_calibration=SigmaCalibration(**sigma) if sigma else None,
                       pair_calibration=PairCalibration(**pairs) if pairs else None,
                       checksum=data.get("checksum"))
        except (KeyError, TypeError, ValueError) as e:
            raise HeadsError(f"{where}: not a heads.json this version reads ({type(e).__name__}: {e}); "
                             "retrain the heads") from None


def _stage(data: dict) -> StageRecord:
    return StageRecord(**{**data, "cache": CacheIdentity(**data["cache"])})


def save_heads(directory: str | os.PathLike, heads: Heads, meta: HeadsMeta) -> Path:
    """Write ``heads`` and ``meta`` into ``directory`` (hidden size and architecture from ``heads``), both files
    or neither (see the module docstring), under the folder's lock (``heads_writer``)."""
    directory = Path(directory)
    state = {name: t.detach().cpu().contiguous().clone() for name, t in heads.state_dict().items()}
    data = safetensors_bytes(state, metadata={"format": "pt"})  # written by us: no stray temp file of its own
    with heads_writer(directory):
        tensors = write_temp(directory / TENSORS, lambda tmp: tmp.write_bytes(data))
        try:
            meta = dataclasses.replace(meta, hidden_size=heads.d, architecture=dict(heads.architecture),
                                       checksum=file_xxh3(tensors), format_version=FORMAT_VERSION)
            text = json_text(meta.to_json())
            pending = write_temp(directory / META, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            with named_for(directory / TENSORS, tensors):
                os.replace(tensors, directory / TENSORS)
        except BaseException:
            tensors.unlink(missing_ok=True)
            raise
        # From here the new pair is the one readers take (meta_file); a failure leaves `pending` for them.
        with named_for(directory / META, pending):
            os.replace(pending, directory / META)
        fsync_folder(directory)
    return directory


@contextlib.contextmanager
def heads_writer(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the heads folder ``directory`` (made if missing) for writing: its lock, taken at once or refused
    (HeadsError naming the holder's pid); what a killed save left is settled first (``recover_heads``). A folder
    made here and still empty at the end (the run failed before saving) is removed."""
    directory = Path(directory)
    made = not directory.exists()
    with named_for(directory, directory):
        directory.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if made:
            stack.callback(_remove_if_empty, directory)
        try:
            stack.enter_context(hold_folder(directory))
        except FolderBusy as e:
            holder = f" (process {e.pid})" if e.pid else ""
            if e.shared:
                raise HeadsError(f"{directory}: an export is copying these heads now{holder}; wait for it to finish, "
                                 "or train into another --heads-dir") from None
            raise HeadsError(f"{directory}: another training is writing these heads now{holder}; wait for it to "
                             "finish (or stop it), or train into another --heads-dir") from None
        recover_heads(directory)
        yield directory


@contextlib.contextmanager
def heads_reader(directory: str | os.PathLike) -> Iterator[Path]:
    """Hold the heads folder ``directory`` for a copy of it: the shared lock, taken at once or refused (HeadsError
    naming the training that writes it); no training can start saving meanwhile."""
    directory = Path(directory)
    if not directory.is_dir():
        raise HeadsError(f"{directory}: no trained heads here ({META} + {TENSORS}); train them first: "
                         "`urm train-heads`")
    try:
        with hold_folder(directory, shared=True):
            yield directory
    except FolderBusy as e:
        holder = f" (process {e.pid})" if e.pid else ""
        raise HeadsError(f"{directory}: a training is writing these heads now{holder}; export once it has "
                         "finished, so that the export holds its heads whole") from None


def copy_heads(directory: str | os.PathLike, tensors_to: Path, meta_to: Path) -> HeadsMeta:
    """Copy the heads pair of ``directory`` (the last complete one: ``meta_file``) to ``tensors_to`` and
    ``meta_to``; returns the ``HeadsMeta`` copied. heads.json is read once, and the copied tensors' xxh3-128 must be
    its checksum (HeadsError otherwise: the folder changed during the copy, or its tensors are not the ones
    heads.json describes), so the copy is one pair. Call it under ``heads_reader``."""
    directory = Path(directory)
    source = meta_file(directory)
    try:
        text = source.read_bytes()
    except OSError as e:
        raise HeadsError(f"{directory}: no trained heads here ({META} + {TENSORS}: {e.strerror}); train them first: "
                         "`urm train-heads`") from None
    try:
        meta = HeadsMeta.from_json(json.loads(text.decode("utf-8-sig")), directory / META)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadsError(f"{directory / META}: unreadable ({e}); retrain the heads") from None
    with named_for(tensors_to, tensors_to):
        shutil.copyfile(directory / TENSORS, tensors_to)
    if meta.checksum is not None and file_xxh3(tensors_to) != meta.checksum:
        raise HeadsError(f"{directory / TENSORS} is not the file {META} describes (its checksum differs from "
                         f"{META}'s): the heads changed while they were copied, or the file was replaced; export again "
                         "(retrain the heads if it persists)")
    meta_to.write_bytes(text)
    return meta


def _remove_if_empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        directory.rmdir()


def pending_metas(directory: Path) -> list[Path]:
    """The heads.json files saves wrote but had not renamed into place yet (``.heads.json.PID.tmp``), newest first."""
    found = [f for f in directory.iterdir() if (p := parse_temp(f.name)) and p[0] == META and p[2] == "tmp"]
    return sorted(found, key=_mtime, reverse=True)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _checksum_in(path: Path) -> str | None:
    """The checksum a heads.json at ``path`` records (None when unreadable, or gone meanwhile)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("checksum") if isinstance(data, dict) else None


def meta_file(directory: str | os.PathLike, tensors: str = TENSORS) -> Path:
    """The file holding the heads' description: heads.json, unless a save was stopped between its renames of
    the tensors and of heads.json; then the heads.json it had written, whose checksum is the tensors' (the
    last complete pair). Only a folder with such a leftover pays for hashing the tensors here."""
    directory = Path(directory)
    meta = directory / META
    if tensors != TENSORS or not directory.is_dir() or not (directory / tensors).is_file():
        return meta
    pending = pending_metas(directory)
    if not pending:
        return meta
    actual = file_xxh3(directory / tensors)
    if _checksum_in(meta) == actual:
        return meta
    return next((f for f in pending if _checksum_in(f) == actual), meta)


def recover_heads(directory: Path) -> None:
    """Under the folder's lock: put in place the heads.json of a save killed between its two renames (the one
    that fits the tensors), then remove every temporary file a save left."""
    source = meta_file(directory)
    if source.name != META:
        os.replace(source, directory / META)
        fsync_folder(directory)
    remove_stale_temps(directory, lambda target: target in (TENSORS, META), include_own=True)


def read_meta(directory: str | os.PathLike, tensors: str = TENSORS) -> HeadsMeta:
    """The ``HeadsMeta`` of the heads folder ``directory`` (HeadsError when missing or unreadable); after a save
    stopped between its renames, that of the last complete pair (``meta_file``)."""
    directory = Path(directory)
    source = meta_file(directory, tensors)
    if not source.is_file() or not (directory / tensors).is_file():
        raise HeadsError(f"{directory}: no trained heads here ({META} + {tensors}); "
                         "train the value head first: `urm train-value-head`")
    try:
        try:
            data = json.loads(source.read_text(encoding="utf-8-sig"))
        except FileNotFoundError:  # the pending heads.json was renamed into place meanwhile
            data = json.loads((directory / META).read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadsError(f"{directory / META}: unreadable ({e}); retrain the heads") from None
    return HeadsMeta.from_json(data, directory / META)


def check_tensors(directory: str | os.PathLike, meta: HeadsMeta, tensors: str = TENSORS) -> None:
    """HeadsError when the tensors file is not the one ``meta`` was saved with (its xxh3-128 differs)."""
    path = Path(directory) / tensors
    if meta.checksum is not None and file_xxh3(path) != meta.checksum:
        raise HeadsError(f"{path} has changed since it was saved (its checksum differs from {META}'s): "
                         "retrain or re-export the heads, or restore the file")


def load_heads(directory: str | os.PathLike, device: str | torch.device = "cpu",
               tensors: str = TENSORS) -> tuple[Heads, HeadsMeta]:
    """The ``Heads`` saved in ``directory`` and their ``HeadsMeta`` (``tensors``: the file holding them;
    an export keeps them, under the same names, in urm-heads.safetensors)."""
    directory = Path(directory)
    meta = read_meta(directory, tensors)
    try:
        heads = Heads(meta.hidden_size, len(meta.attributes), **meta.architecture)
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: torch, on a negative size
        raise HeadsError(f"{directory / META}: its architecture {meta.architecture} is not one this version builds "
                         f"({e}); retrain the heads") from None
    check_tensors(directory, meta, tensors)
    try:
        state = load_file(str(directory / tensors))
    except Exception as e:  # safetensors raises its own error type for a truncated or foreign file
        raise HeadsError(f"{directory / tensors}: not a readable safetensors file ({type(e).__name__}: {e}); "
                         "retrain the heads (or export them again)") from None
    try:
        heads.load_state_dict(state)
    except RuntimeError as e:
        raise HeadsError(f"{directory / tensors} does not match {META}: {str(e).splitlines()[0]}; retrain the "
                         "heads") from None
    return heads.to(device), meta
