"""A seeded fuzzer of the `urm` command line: bad data files, damaged caches, heads and exports, bad options.

    python tests/fuzz_cli.py WORKDIR [--seed 0] [--scale 1.0] [--processes 24] [--report report.json]

It builds valid artifacts once in WORKDIR (a tiny random Llama, data files in three formats, a
ratings and a preference cache of several parts, heads trained on them, and their export), then
makes every case by damaging a fresh copy of one of them, or by giving one bad option value, and
runs the command on it. A case passes when the command

  - exits non-zero (with the exit code the case expects, where it expects one),
  - prints no Python traceback,
  - prints exactly one error line (``error: ...``, or click's ``Error: ...`` for a usage error) that
    contains every "needle" of the case: the damaged file, the row, the option,
  - leaves no output behind (no complete cache, heads, export, report or score file), and leaves a
    heads folder it was given as it was.

One more class, "repair": a damaged part of a cache is rebuilt by running `urm extract` again, which
must exit 0 with the cache then verifying and holding the original bytes.

"curate" runs `urm curate` on a bad pair file, a damaged export, heads folder or preference cache, a ratings
cache, a bad option or an -o that is a file: OUT_DIR must not exist afterwards, or one there before is as it was.

Writes (the block "Heads folder writes"): "kill" kills a training (a forked child running the CLI) at one
step of a heads save, chosen at random among every fsync and rename of it, and the folder must then load
as the old heads or the new ones, with nothing left once the next writer opens it; "writers" starts a
second training into a heads folder that a first one (paused in its save) holds, which must be refused
at once naming the holder's pid, the first then finishing; "disk" gives the command a full disk (the
temporary file of one of its outputs is a link to /dev/full, so the writer library gets the kernel's
ENOSPC) or an output path that is a folder, which must end in one line naming the user's path and the
cause, leaving the old output as it was.

Cases run in this process through click's test runner (each a fresh invocation of the app, on its
own copy of the artifacts), so several hundred take a minute or two; ``--processes`` of them, drawn
at random, also run as real `urm` processes, whose exit code and error line must match. The report
(JSON) holds every case and its outcome, and the counts per class. tests/test_fuzz.py runs this file
in a subprocess and fails on any failed case.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

ATTRS = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
N_ROWS = 12  # rows in each data file


@dataclass
class Case:
    """One bad input: the command line to run, and what its one error line must say."""

    kind: str  # data | cache | heads | export | option | preset | repair
    label: str  # what was damaged, and how
    argv: list[str]
    needles: list[str]
    code: int | None = None  # the exit code it must end with (None: any non-zero)
    must_not_exist: list[str] = field(default_factory=list)  # outputs a failed command must not leave
    unchanged: dict[str, str] = field(default_factory=dict)  # file -> its checksum before the run
    repair: dict[str, str] = field(default_factory=dict)  # repair cases: part file -> original checksum
    seed: float = 0.0  # the case's own generator seed: the same case can be made again elsewhere
    runner: str = ""  # a case run its own way (RUNNERS: kill, writers, disk); "" is invoke + judge
    extra: dict = field(default_factory=dict)  # what that runner needs


@dataclass
class Base:
    """The valid artifacts every case starts from (read-only: cases damage copies)."""

    root: Path
    backbone: Path
    files: dict[str, Path]  # "ratings" | "preferences" | "conversations" -> a valid JSONL file
    cache: Path  # holds ratings/ and preferences/
    heads: Path
    export: Path


# ----------------------------------------------------------------------------------------------
# The valid artifacts


def rating_rows(rng: random.Random) -> list[dict]:
    words = "the model answers the question clearly with a short correct example and a reason".split()
    return [{"prompt": f"Question {i}: " + " ".join(rng.choices(words, k=6)),
             "response": " ".join(rng.choices(words, k=8)), **{a: rng.randint(0, 4) for a in ATTRS}}
            for i in range(N_ROWS)]


def conversation(i: int, reply: str) -> list[dict]:
    return [{"role": "user", "content": f"Question {i}: what is {i} plus {i}?"}, {"role": "assistant", "content": reply}]


def preference_rows() -> list[dict]:
    return [{"chosen": conversation(i, f"It is {2 * i}."), "rejected": conversation(i, f"It is {2 * i + 1}.")}
            for i in range(N_ROWS)]


def conversation_rows() -> list[dict]:
    return [{"messages": conversation(i, f"It is {2 * i}.")} for i in range(N_ROWS)]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke(argv: list[str]) -> tuple[int, str, BaseException | None]:
    """Run the CLI in this process: (exit code, stdout + stderr, the exception that escaped it if any)."""
    from typer.testing import CliRunner

    from cli import app

    result = CliRunner().invoke(app, argv)
    escaped = result.exception if result.exception and not isinstance(result.exception, SystemExit) else None
    return result.exit_code, result.output, escaped


def build_base(root: Path) -> Base:
    from tiny_models import build_tiny_llama

    root.mkdir(parents=True, exist_ok=True)
    backbone = build_tiny_llama(root / "backbone")
    data = root / "data"
    data.mkdir(exist_ok=True)
    files = {"ratings": write_jsonl(data / "ratings.jsonl", rating_rows(random.Random(0))),
             "preferences": write_jsonl(data / "preferences.jsonl", preference_rows()),
             "conversations": write_jsonl(data / "conversations.jsonl", conversation_rows())}
    cache = root / "cache"
    for name, source, kind in (("ratings", "synthetic:ratings?n=40&seed=0", "ratings"),
                               ("preferences", "synthetic:preferences?n=32&seed=1", "preferences")):
        must_pass(["extract", *extract_args(backbone, cache), "--source", source, "--kind", kind, "--name", name])
    heads = root / "heads"
    must_pass(["train-heads", "--cache-dir", str(cache), "--heads-dir", str(heads), *TRAIN_ARGS])
    export = root / "model"
    must_pass(["export", "--backbone", str(backbone), "--heads-dir", str(heads), "--out-dir", str(export), "--no-link"])
    return Base(root, backbone, files, cache, heads, export)


def must_pass(argv: list[str]) -> None:
    code, output, escaped = invoke(argv)
    if code != 0 or escaped:
        raise SystemExit(f"building the fuzz base failed: urm {' '.join(argv)}\n{output}\n{escaped!r}")


def extract_args(backbone: Path, cache: Path) -> list[str]:
    return ["--backbone", str(backbone), "--cache-dir", str(cache), "--device", "cpu", "--part-rows", "8"]


TRAIN_ARGS = ["--device", "cpu", "--epochs", "3", "--gate-epochs", "2", "--batch-size", "16", "--gate-batch-size", "16"]


# ----------------------------------------------------------------------------------------------
# Byte-level damage


def flip(path: Path, rng: random.Random, start: int = 0) -> str:
    data = bytearray(path.read_bytes())
    k = rng.randint(1, 4)
    for _ in range(k):
        i = rng.randrange(start, len(data))
        data[i] ^= rng.randrange(1, 256)
    path.write_bytes(bytes(data))
    return f"{k} bytes changed"


def truncate(path: Path, rng: random.Random) -> str:
    data = path.read_bytes()
    keep = rng.randrange(0, len(data))
    path.write_bytes(data[:keep])
    return f"truncated to {keep} bytes"


def append(path: Path, rng: random.Random) -> str:
    path.write_bytes(path.read_bytes() + rng.randbytes(rng.randint(1, 64)))
    return "bytes appended"


def zero(path: Path, rng: random.Random) -> str:
    path.write_bytes(bytes(path.stat().st_size))
    return "zero-filled"


def delete(path: Path, rng: random.Random) -> str:
    path.unlink()
    return "deleted"


def garbage(path: Path, rng: random.Random) -> str:
    path.write_bytes(rng.randbytes(rng.randint(1, 200)))
    return "replaced by random bytes"


BYTE_DAMAGE = (flip, truncate, append, zero, delete, garbage)


def checksum(path: Path) -> str:
    from pipeline.hashing import file_xxh3

    return file_xxh3(path)


def copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)  # real copies: damage never reaches the base (no hardlinks)
    return dst


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    value = json.loads(path.read_text())
    change(value)
    path.write_text(json.dumps(value))


# ----------------------------------------------------------------------------------------------
# Bad data files (extract, score)


def row_damage(fmt: str, rng: random.Random) -> tuple[str, Callable[[dict], object], str | None]:
    """(what, a function that damages one row or returns a replacement, the field it names or None)."""
    if fmt == "ratings":
        choices = [
            ("prompt removed", lambda r: r.pop("prompt"), "prompt"),
            ("response removed", lambda r: r.pop("response"), "response"),
            ("prompt is a number", lambda r: r.update(prompt=42), "prompt"),
            ("response is a list", lambda r: r.update(response=["a", "b"]), "response"),
            ("response is null", lambda r: r.update(response=None), "response"),
        ]
        attr = rng.choice(ATTRS)
        bad = rng.choice([7, -1, 4.5, "high", True, [3], {"v": 3}, 1e9])
        choices.append((f"{attr} = {bad!r}", lambda r: r.update({attr: bad}), attr))
    elif fmt == "preferences":
        side = rng.choice(["chosen", "rejected"])
        choices = [
            (f"{side} removed", lambda r: r.pop(side), side),
            (f"{side} is a number", lambda r: r.update({side: 42}), side),
            (f"{side} is an empty list", lambda r: r.update({side: []}), side),
            (f"{side} has a role 'robot'", lambda r: r[side][0].update(role="robot"), side),
            (f"{side} ends with the user", lambda r: r.update({side: r[side][:1]}), side),
            (f"{side} content is a dict", lambda r: r[side][1].update(content={"x": 1}), side),
            (f"{side} message without content", lambda r: r[side][1].pop("content"), side),
            (f"{side} message is a string", lambda r: r[side].__setitem__(0, "hello"), side),
        ]
    else:
        choices = [
            ("messages removed", lambda r: r.pop("messages"), None),
            ("messages is a string", lambda r: r.update(messages="hello"), "messages"),
            ("messages is empty", lambda r: r.update(messages=[]), "messages"),
            ("a role 'robot'", lambda r: r["messages"][0].update(role="robot"), "messages"),
            ("ends with the user", lambda r: r.update(messages=r["messages"][:1]), "messages"),
            ("content is null", lambda r: r["messages"][1].update(content=None), "messages"),
        ]
    return rng.choice(choices)


def bad_data_file(fmt: str, src: Path, d: Path, rng: random.Random) -> tuple[Path, str, list[str]]:
    """A damaged copy of the valid file ``src`` of format ``fmt``: (path, what was done, needles)."""
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    path = d / f"bad-{fmt}.jsonl"
    how = rng.choice(["row", "row", "row", "row", "not object", "json", "encoding", "empty", "missing", "directory",
                      "gzip", "parquet", "json array", "suffix", "binary"])
    r = rng.randint(1, N_ROWS)
    if how == "row":
        what, damage, fieldname = row_damage(fmt, rng)
        damage(rows[r - 1])
        write_jsonl(path, rows)
        return path, f"row {r}: {what}", [path.name, f"row {r}"] + ([fieldname] if fieldname else [])
    if how == "not object":
        rows[r - 1] = rng.choice([[1, 2], "a string", 5, None])
        write_jsonl(path, rows)
        return path, f"row {r} is not an object", [path.name, f"row {r}"]
    if how == "json":
        lines = [json.dumps(x) for x in rows]
        lines[r - 1] = lines[r - 1][: rng.randrange(1, len(lines[r - 1]) - 1)]
        path.write_text("\n".join(lines) + "\n")
        return path, f"row {r} is cut short", [path.name, f"row {r}", "malformed JSON"]
    if how == "encoding":
        encoding = rng.choice(["latin-1", "utf-16", "cp1252"])
        text = "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows).replace("Question", "Quéstion", 1)
        path.write_bytes(text.encode(encoding))
        return path, f"encoded as {encoding}", [path.name, "not UTF-8"]
    if how == "empty":
        path.write_text(rng.choice(["", "\n\n  \n"]))
        return path, "empty", [path.name, "no rows"]
    if how == "missing":
        return d / "no-such-file.jsonl", "missing", ["no-such-file.jsonl", "file not found"]
    if how == "directory":
        folder = d / "a-folder.jsonl"
        folder.mkdir()
        return folder, "a directory", ["a-folder.jsonl", "not a file"]
    if how == "gzip":
        path = d / f"bad-{fmt}.jsonl.gz"
        data = gzip.compress(src.read_bytes())
        path.write_bytes(data[: rng.randrange(10, len(data) - 4)])
        return path, "truncated gzip", [path.name, "cannot read"]
    if how == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = d / f"bad-{fmt}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        damage = rng.choice([truncate, garbage])
        damage(path, rng)
        return path, f"parquet {damage.__name__}", [path.name, "not a readable parquet file"]
    if how == "json array":
        path = d / f"bad-{fmt}.json"
        text = json.dumps(rows)
        path.write_text(text[: rng.randrange(1, len(text) - 1)])
        return path, "JSON array cut short", [path.name]
    if how == "suffix":
        path = d / f"bad-{fmt}.csv"
        shutil.copyfile(src, path)
        return path, "unknown suffix", [path.name, "unknown file type"]
    path.write_bytes(b"\x00\x01\x02" + rng.randbytes(100))
    return path, "binary", [path.name]


def data_case(base: Base, d: Path, rng: random.Random) -> Case:
    command = rng.choice(["extract ratings", "extract preferences", "score conversations", "score preferences"])
    fmt = command.split()[1]
    path, what, needles = bad_data_file(fmt, base.files[fmt], d, rng)
    argv = base_argv(command.split()[0], base, d, source=path, kind=fmt, input=path)
    if command.startswith("extract"):
        if rng.random() < 0.1 and what.startswith("row"):  # or every row too long
            write_jsonl(path, [json.loads(x) for x in base.files[fmt].read_text().splitlines()])
            argv += ["--max-length", "4"]
            what, needles = "every row longer than --max-length 4", [path.name, "longer than max_length=4"]
        return Case("data", f"{command}: {what}", argv, needles, must_not_exist=[str(d / "cache/x/_manifest.json")])
    return Case("data", f"{command}: {what}", argv, needles, must_not_exist=[str(d / "scores.jsonl")])


# ----------------------------------------------------------------------------------------------
# Damaged caches (train-heads, train-value-head, train-gating, evaluate, cache info; repair by extract)


def cache_damage(folder: Path, rng: random.Random) -> tuple[str, list[str], bool]:
    """Damage the cache ``folder`` in place: (what, needles, whether extract can rebuild it)."""
    parts = sorted(folder.glob("part-*.parquet"))
    manifest = folder / "_manifest.json"
    if rng.random() < 0.6:
        part = rng.choice(parts)
        damage = rng.choice([flip, flip, truncate, append, zero, delete, "swap"])
        if damage == "swap":
            other = rng.choice([p for p in parts if p != part])
            shutil.copyfile(other, part)
            return f"{part.name} replaced by {other.name}", [part.name], True
        what = damage(part, rng)
        return f"{part.name} {what}", [part.name], True
    i = rng.randrange(len(parts))
    choices = [
        ("manifest truncated", lambda: truncate(manifest, rng), [manifest.name]),
        ("manifest replaced by random bytes", lambda: garbage(manifest, rng), [manifest.name]),
        ("manifest deleted", lambda: delete(manifest, rng), [manifest.name]),
        ("manifest is a JSON list", lambda: manifest.write_text("[1, 2]"), [manifest.name]),
        ("manifest rows + 1", lambda: edit_json(manifest, lambda m: m.update(rows=m["rows"] + 1)), [manifest.name]),
        ("manifest marked incomplete", lambda: edit_json(manifest, lambda m: m.update(complete=False)),
         ["incomplete"]),
        (f"parts[{i}] dropped from the manifest",
         lambda: edit_json(manifest, lambda m: m.update(parts=m["parts"][:i] + m["parts"][i + 1:])), [folder.name]),
        (f"parts[{i}] checksum changed",
         lambda: edit_json(manifest, lambda m: m["parts"][i].update(xxh3_128="0" * 32)), [parts[i].name]),
        (f"parts[{i}] bytes changed",
         lambda: edit_json(manifest, lambda m: m["parts"][i].update(bytes=m["parts"][i]["bytes"] + 7)),
         [parts[i].name]),
        (f"parts[{i}] file points outside the cache",
         lambda: edit_json(manifest, lambda m: m["parts"][i].update(file="../../ratings.jsonl")), [manifest.name]),
    ]
    key = rng.choice(["rows", "parts", "hidden_size", "storage_dtype", "kind", "complete", "label_names"])
    choices.append((f"manifest key {key!r} removed", lambda: edit_json(manifest, lambda m: m.pop(key)),
                    [manifest.name, key]))
    bad = rng.choice(["many", None, -3, [1], {"a": 1}, 2.5])
    key2 = rng.choice(["rows", "parts", "hidden_size", "storage_dtype", "kind", "max_length"])
    choices.append((f"manifest {key2!r} = {bad!r}", lambda: edit_json(manifest, lambda m: m.update({key2: bad})),
                    [manifest.name, key2]))
    part_key = rng.choice(["file", "rows", "bytes", "xxh3_128"])
    choices.append((f"parts[{i}].{part_key} removed", lambda: edit_json(
        manifest, lambda m: [m["parts"][i].pop(part_key), m["parts"][i].pop("sha256", None)]), [manifest.name]))
    what, act, needles = rng.choice(choices)
    act()
    return what, needles, False


def cache_case(base: Base, d: Path, rng: random.Random) -> Case:
    cache = copy(base.cache, d / "cache")
    which = rng.choice(["ratings", "preferences"])
    what, needles, rebuildable = cache_damage(cache / which, rng)
    commands = ["cache info", "train-heads", "evaluate", "train-value-head" if which == "ratings" else "train-gating"]
    if rebuildable and which == "ratings":
        commands.append("repair")
    command = rng.choice(commands)
    label = f"{command}: {which} cache: {what}"
    if command == "cache info":
        return Case("cache", label, ["cache", "info", str(cache / which)], needles, code=1)
    if command in ("train-heads", "train-value-head"):
        return Case("cache", label, base_argv(command, base, d, cache=cache), needles, must_not_exist=[str(d / "heads")])
    if command == "train-gating":
        heads = copy(base.heads, d / "heads")
        return Case("cache", label, base_argv(command, base, d, cache=cache), needles, unchanged=snapshot(heads))
    if command == "evaluate":
        return Case("cache", label, base_argv(command, base, d, cache=cache), needles, must_not_exist=[str(d / "eval")])
    originals = {p.name: checksum(p) for p in sorted((base.cache / "ratings").glob("part-*.parquet"))}
    argv = base_argv("extract", base, d, cache=cache, source="synthetic:ratings?n=40&seed=0", name="ratings")
    return Case("repair", f"extract rebuilds: ratings cache: {what}", argv, [], code=0, repair=originals)


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p): checksum(p) for p in sorted(folder.iterdir()) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# Damaged heads (export, train-gating, evaluate) and exports (score, evaluate)


def heads_damage(folder: Path, rng: random.Random, meta_name: str = "heads.json",
                 tensors_name: str = "heads.safetensors") -> tuple[str, list[str]]:
    meta, tensors = folder / meta_name, folder / tensors_name
    if rng.random() < 0.45:
        damage = rng.choice(BYTE_DAMAGE)
        return f"{tensors_name} {damage(tensors, rng)}", [tensors_name]
    choices = [
        (f"{meta_name} truncated", lambda: truncate(meta, rng)),
        (f"{meta_name} random bytes", lambda: garbage(meta, rng)),
        (f"{meta_name} deleted", lambda: delete(meta, rng)),
        (f"{meta_name} is a JSON list", lambda: meta.write_text("[]")),
        ("checksum changed", lambda: edit_json(meta, lambda m: m.update(checksum="f" * 32))),
        ("hidden_size changed", lambda: edit_json(meta, lambda m: m.update(hidden_size=m["hidden_size"] * 2))),
        ("an attribute dropped", lambda: edit_json(meta, lambda m: m["attributes"].pop())),
        ("ensemble members changed", lambda: edit_json(meta, lambda m: m["architecture"].update(members=3))),
    ]
    key = rng.choice(["attributes", "hidden_size", "architecture", "value_head", "format_version"])
    choices.append((f"{meta_name} key {key!r} removed", lambda: edit_json(meta, lambda m: m.pop(key))))
    bad = rng.choice(["x", None, -1, [1], {"a": 1}])
    key2 = rng.choice(["attributes", "hidden_size", "architecture", "value_head"])
    choices.append((f"{meta_name} {key2!r} = {bad!r}", lambda: edit_json(meta, lambda m: m.update({key2: bad}))))
    what, act = rng.choice(choices)
    act()
    needles = [tensors_name] if what in ("checksum changed",) else [meta_name]
    if what in ("hidden_size changed", "an attribute dropped", "ensemble members changed"):
        needles = [folder.name]  # the file pair disagrees: named by its folder
    return what, needles


def heads_case(base: Base, d: Path, rng: random.Random) -> Case:
    heads = copy(base.heads, d / "heads")
    what, needles = heads_damage(heads, rng)
    command = rng.choice(["export", "train-gating", "evaluate"])
    label, argv = f"{command}: heads: {what}", base_argv(command, base, d, heads=heads)  # train-gating: d/heads
    if command == "train-gating":
        return Case("heads", label, argv, needles, unchanged=snapshot(heads))
    return Case("heads", label, argv, needles, must_not_exist=[str(d / ("model" if command == "export" else "eval"))])


EXPORT_FILES = ("model-backbone.safetensors", "urm-heads.safetensors", "config.json", "tokenizer.json",
                "tokenizer_config.json", "model.safetensors.index.json", "modeling_urm.py", "heads.json")


def export_case(base: Base, d: Path, rng: random.Random) -> Case:
    model = copy(base.export, d / "model")
    out = d / "scores.jsonl"
    score = base_argv("score", base, d, model=model)
    roll = rng.random()
    if roll < 0.2:  # the export's copy of the heads: evaluate reads it too
        what, needles = heads_damage(model, rng, tensors_name="urm-heads.safetensors")
        if rng.random() < 0.5:
            return Case("export", f"evaluate: export: {what}", base_argv("evaluate", base, d, heads=model), needles,
                        must_not_exist=[str(d / "eval")])
        return Case("export", f"score: export: {what}", score, [model.name], must_not_exist=[str(out)])
    if roll < 0.3:
        record = model / "urm_export.json"
        name = rng.choice(EXPORT_FILES)
        choices = [("urm_export.json truncated", lambda: truncate(record, rng), [record.name]),
                   ("urm_export.json random bytes", lambda: garbage(record, rng), [record.name]),
                   (f"checksum of {name} changed",
                    lambda: edit_json(record, lambda m: m["checksums"].update({name: "0" * 32})), [name])]
        what, act, needles = rng.choice(choices)
        act()
        return Case("export", f"score: export: {what}", score, needles, must_not_exist=[str(out)])
    name = rng.choice(EXPORT_FILES)
    path = model / name
    if name.endswith(".json") and rng.random() < 0.4:
        key = {"config.json": "urm", "tokenizer_config.json": "tokenizer_class",
               "model.safetensors.index.json": "weight_map", "heads.json": "attributes",
               "tokenizer.json": "model"}[name]
        edit_json(path, lambda m: m.pop(key))
        what = f"{name}: key {key!r} removed"
        argv, needles = score, [name]
    elif rng.random() < 0.25 and name not in ("modeling_urm.py", "model.safetensors.index.json"):
        # unchecked (--no-verify), a file that is not whole must still end in one line from its loader
        what = f"{name} {rng.choice([truncate, garbage, zero])(path, rng)} (--no-verify)"
        argv, needles = [*score, "--no-verify"], [model.name]
    else:  # other bytes in a valid file (or none): only the checksum can tell
        what = f"{name} {rng.choice(BYTE_DAMAGE)(path, rng)}"
        argv, needles = score, [name]
    return Case("export", f"score: export: {what}", argv, needles, must_not_exist=[str(out)])


# ----------------------------------------------------------------------------------------------
# Bad option values and presets


WHOLE = {"limit", "max_length", "max_tokens_per_batch", "part_rows", "tensor_parallel_size", "ensemble", "epochs", "batch_size", "patience",
         "gate_hidden", "gate_epochs", "gate_batch_size", "gate_patience"}
POSITIVE = {"lr", "gate_lr", "temperature", "memory_budget"}
NON_NEGATIVE = {"weight_decay", "gate_weight_decay"}
FRACTIONS = {"calibration_fraction", "val_fraction", "gate_val_fraction", "gpu_memory_utilization"}
CHOICES = {"dtype", "attn_implementation", "device", "kind", "format", "storage_dtype", "loss", "gate", "reward",
           "engine"}
RISKS = {"risk"}  # a number from 0 to 1e6 (MAX_RISK)
STAGES = {"extract": ["extract"], "train-heads": ["value_head", "gating"], "train-value-head": ["value_head"],
          "train-gating": ["gating"], "export": ["export"], "evaluate": ["evaluate"], "score": ["score"]}


def bad_values(name: str, typ: str) -> list[str]:
    values = []
    if typ.startswith("int"):
        values += ["abc", "2.5", ""]
    if typ.startswith("float"):
        values += ["abc", "nan", "inf", "-inf"]
    if name in WHOLE:
        values += ["0", "-3"]
    if name == "baseline_ensemble":
        values += ["1", "0", "-2"]
    if name in POSITIVE:
        values += ["0", "-1", "1e400"]
    if name in NON_NEGATIVE:
        values += ["-0.1"]
    if name in RISKS:
        values += ["-1", "-0.1", "1e400", "1e308", "1000001"]
    if name == "beta":
        values += ["-0.5", "1.5"]
    if name in FRACTIONS:
        values += ["0", "1", "1.5", "-0.1"]
    if name in CHOICES:
        values += ["bogus", "FLOAT16", ""] + (["gpu", "cuda:99", "tpu"] if name == "device" else []) + (
            ["max", "LCB", "ucb", "ELCB"] if name == "reward" else [])
    return values


def base_argv(command: str, base: Base, d: Path, *, cache: Path | None = None, heads: Path | None = None,
              model: Path | None = None, source: Path | str | None = None, kind: str = "ratings", name: str = "x",
              input: Path | None = None) -> list[str]:
    """A valid command line of ``command`` on the base artifacts, writing under the case folder ``d``; a case
    points one input at its damaged copy (``cache``, ``heads``, ``model``, ``source`` / ``input``) or adds
    a bad option."""
    if command == "extract":
        return ["extract", *extract_args(base.backbone, cache or d / "cache"), "--source",
                str(source or base.files["ratings"]), "--kind", kind, "--name", name]
    if command in ("train-heads", "train-value-head", "train-gating"):
        args = {"train-heads": TRAIN_ARGS, "train-value-head": ["--device", "cpu", "--epochs", "3"],
                "train-gating": ["--device", "cpu", "--gate-epochs", "2"]}[command]
        return [command, "--cache-dir", str(cache or base.cache), "--heads-dir", str(d / "heads"), *args]
    if command == "export":
        return ["export", "--backbone", str(base.backbone), "--heads-dir", str(heads or base.heads), "--out-dir",
                str(d / "model")]
    if command == "evaluate":
        cache = cache or base.cache
        return ["evaluate", str(heads or base.heads), "--eval-ratings", str(cache / "ratings"), "--eval-preferences",
                str(cache / "preferences"), "--no-baselines", "--report-dir", str(d / "eval"), "--device", "cpu"]
    assert command == "score", command
    return ["score", str(model or base.export), "-i", str(input or base.files["conversations"]), "-o",
            str(d / "scores.jsonl"), "--device", "cpu"]


def option_cases(base: Base) -> list[tuple[str, str, str, int]]:
    """Every (command, option, bad value, exit code) the option rules give."""
    from pipeline import configs as C

    cases = []
    for command, stages in STAGES.items():
        seen = set()
        for stage in stages:
            for o in C.options(C.STAGES[stage]):
                if not o.cli or o.name in seen:
                    continue
                seen.add(o.name)
                typ = getattr(o.type, "__name__", str(o.type))
                cases += [(command, o.name, v, 2) for v in bad_values(o.name, typ)]
        missing = {"train-heads": "cache_dir", "train-value-head": "cache_dir", "train-gating": "heads_dir",
                   "export": "heads_dir", "evaluate": "eval_ratings", "extract": "backbone"}.get(command)
        if missing:
            cases.append((command, missing, "/nonexistent/place", 1))
    return cases


def option_case(base: Base, d: Path, rng: random.Random, spec: tuple[str, str, str, int]) -> Case:
    command, name, value, code = spec
    argv = base_argv(command, base, d)
    flag = "--" + name.replace("_", "-")
    if flag in argv:  # replace the valid value
        i = argv.index(flag)
        argv = argv[:i] + argv[i + 2:]
    outputs = [str(d / n) for n in ("cache/x/_manifest.json", "heads", "model", "eval", "scores.jsonl")]
    needles = [flag] if code == 2 else ["/nonexistent/place"]
    return Case("option", f"{command} {flag} {value!r}", [*argv, flag, value], needles, code=code,
                must_not_exist=outputs)


def misspelt_option_case(base: Base, d: Path, rng: random.Random) -> Case:
    command = rng.choice(list(STAGES))
    argv = base_argv(command, base, d)
    flags = [a for a in argv if a.startswith("--") and a not in ("--no-baselines",)]
    flag = rng.choice(flags)
    i = rng.randrange(3, len(flag))
    wrong = flag[:i] + flag[i + 1:]
    argv = [wrong if a == flag else a for a in argv]
    return Case("option", f"{command}: {flag} misspelt {wrong}", argv, [wrong], code=2)


PRESET_MISTAKES = [  # (the file, what its one error line must say after the file's name); test_failures runs them too
    ("[extrct]\nmax_length = 3\n", ["has unknown tables ['extrct']; did you mean 'extract'?"]),
    ("[extract]\nmax_length = \"long\"\n", ["max_length must be a whole number, got str 'long'"]),
    ("[value_head]\nepochs = \"many\"\n", ["epochs"]),
    ("[value_head]\nlr = true\n", ["lr must be a number, got bool True"]),
    ("[value_head]\nepochs = 0\n", ["epochs"]),
    ("[gating]\ngate = \"sotfmax\"\n", ["gate", "did you mean 'softmax'?"]),
    ("[gating]\ngate_lr = -1.0\n", ["gate_lr"]),
    ("[evaluate]\neval_preferences = \"one\"\n", ["eval_preferences must be a list of strings"]),
    ("[datasets.x]\nkind = \"ratings\"\nsorce = \"a.jsonl\"\n",
     ["[datasets.x] has unknown keys ['sorce']; did you mean 'source'?"]),
    ("[datasets.x]\nkind = \"ratings\"\n", ["[datasets.x] has no 'source'"]),
    ("[datasets.x]\nkind = \"rating\"\nsource = \"a.jsonl\"\n", ["did you mean 'ratings'?"]),
    ("datasets = 3\n", ["datasets must be a table, got int 3"]),
    ("[extract]\nmax_length = 1e400\n", ["max_length"]),
    ("[extract\nmax_length = 3\n", ["not valid TOML"]),
    ("max_length = = 3\n", ["not valid TOML"]),
    ("[score]\ndevice = 3\n", ["device"]),
    ("[value_head]\nval_fraction = 1.0\n", ["val_fraction"]),
]


def preset_case(base: Base, d: Path, rng: random.Random) -> Case:
    text, needles = rng.choice(PRESET_MISTAKES)
    preset = d / "mine.toml"
    if rng.random() < 0.15:
        preset.write_bytes("[extract]\nbackbone = \"é\"\n".encode("latin-1"))
        text, needles = "(Latin-1 bytes)", ["UTF-8"]
    else:
        preset.write_text(text)
    command = rng.choice(list(STAGES))
    argv = [*base_argv(command, base, d), "-p", str(preset)]
    return Case("preset", f"{command} -p: {text.strip()!r}", argv, [preset.name, *needles], code=2)


# ----------------------------------------------------------------------------------------------
# Heads folder writes: a training killed at a step of its save, two writers, a full disk


SAVE_STEPS = {"train-heads": 10, "train-value-head": 5, "train-gating": 5}  # the fsyncs and renames of its saves


def on_save_steps(folder: Path, at_step: Callable[[int], None]) -> None:
    """Call ``at_step(n)`` before the n-th fsync or rename (from 0) of a path in ``folder``, in this process:
    a heads save is 5 of them (fsync tensors' and heads.json's temporary files, rename each, fsync the folder)."""
    import pipeline.atomic as A

    real_fsync, real_replace, count = A._fsync, os.replace, [0]

    def step(path) -> None:
        if str(path).startswith(str(folder)):
            at_step(count[0])
            count[0] += 1

    def fsync(path):
        step(path)
        return real_fsync(path)

    def replace(src, dst, **kwargs):
        step(dst)
        return real_replace(src, dst, **kwargs)

    A._fsync, os.replace = fsync, replace


def forked_cli(argv: list[str], folder: Path, at_step: Callable[[int], None]) -> int:
    """The pid of a forked child running the CLI on ``argv`` with ``on_save_steps(folder, at_step)``; it exits
    with the command's exit code. One torch thread in it, as in a DataLoader worker (a forked OpenMP pool hangs)."""
    pid = os.fork()
    if pid == 0:
        code = 70
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(null, 2)
            import torch

            torch.set_num_threads(1)
            on_save_steps(folder, at_step)
            code = invoke(argv)[0]
        finally:
            os._exit(code)
    return pid


def exit_code(status: int) -> int:
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def heads_state(folder: Path) -> tuple[str | None, list[str]]:
    """(the checksum of the tensors a load takes, problems): the folder must load, and hold no temporary file
    once the next writer has opened it (a killed save's leftovers are settled then)."""
    from pipeline.atomic import parse_temp
    from pipeline.model import heads_writer, load_heads

    try:
        _, meta = load_heads(folder)
    except Exception as e:
        return None, [f"the heads folder does not load: {type(e).__name__}: {e}"]
    with heads_writer(folder):
        pass
    problems = [f"{p.name} left after the next writer opened the folder" for p in folder.iterdir()
                if parse_temp(p.name)]
    try:
        _, again = load_heads(folder)
        if again != meta:
            problems.append("the next writer changed which heads the folder holds")
    except Exception as e:
        problems.append(f"the heads folder does not load after the next writer opened it: {e}")
    return meta.checksum, problems


def kill_case(base: Base, d: Path, rng: random.Random) -> Case:
    command = rng.choice(list(SAVE_STEPS))
    step = rng.randrange(SAVE_STEPS[command])
    heads = copy(base.heads, d / "heads")
    return Case("kill", f"{command} killed before step {step} of {SAVE_STEPS[command]} of its saves",
                base_argv(command, base, d), [], runner="kill", extra={"heads": str(heads), "step": step})


def run_kill_case(case: Case) -> tuple[int, str, list[str]]:
    from pipeline.model import read_meta

    heads, step = Path(case.extra["heads"]), case.extra["step"]
    old = read_meta(heads).checksum

    def kill_at(n: int) -> None:
        if n == step:
            os.kill(os.getpid(), 9)

    _, status = os.waitpid(forked_cli(case.argv, heads, kill_at), 0)
    code = exit_code(status)
    problems = [] if code == -9 else [f"exit {code}: the training was not killed at step {step} of its saves"]
    checksum, found = heads_state(heads)
    which = "old" if checksum == old else "new"
    return code, f"killed (exit {code}) at save step {step}: the folder loads as the {which} heads", problems + found


def writers_case(base: Base, d: Path, rng: random.Random) -> Case:
    first, second = rng.choice(list(SAVE_STEPS)), rng.choice(list(SAVE_STEPS))
    heads = copy(base.heads, d / "heads")
    return Case("writers", f"{second} while {first} writes the same heads folder", base_argv(second, base, d),
                [str(heads), "another training is writing these heads now"], code=1, runner="writers",
                extra={"heads": str(heads), "first": base_argv(first, base, d)})


def training_held_at_its_save(case: Case) -> tuple[int | None, Path]:
    """Fork the case's first training, held at its first save step (holding the heads folder) until the returned
    ``go`` file exists: (its pid, go), or (None, go) if it never reached the save."""
    heads = Path(case.extra["heads"])
    ready, go = heads.parent / "first-is-saving", heads.parent / "go-on"

    def pause(n: int) -> None:
        if n == 0:
            ready.touch()
            deadline = time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.01)

    first = forked_cli(case.extra["first"], heads, pause)
    deadline = time.monotonic() + 120
    while not ready.exists() and time.monotonic() < deadline and os.waitpid(first, os.WNOHANG) == (0, 0):
        time.sleep(0.02)
    if not ready.exists():
        go.touch()
        return None, go
    return first, go


def run_writers_case(case: Case) -> tuple[int, str, list[str]]:
    heads = Path(case.extra["heads"])
    first, go = training_held_at_its_save(case)
    if first is None:
        return 1, "", ["the first training did not reach its save"]
    before = snapshot(heads)
    code, output, escaped = invoke(case.argv)
    case.needles.append(f"(process {first})")
    problems = judge(case, code, output, escaped)
    if snapshot(heads) != before:
        problems.append("the refused training changed the heads folder")
    go.touch()
    _, status = os.waitpid(first, 0)
    if exit_code(status) != 0:
        problems.append(f"the first training ended with exit {exit_code(status)}, not 0")
    problems += heads_state(heads)[1]
    return code, output, problems


def disk_case(base: Base, d: Path, rng: random.Random) -> Case:
    roll = rng.random()
    if roll < 0.1:  # an output path that is a folder
        out = d / "scores.jsonl"
        out.mkdir()
        argv = base_argv("score", base, d)
        return Case("disk", "score -o FOLDER", argv, [str(out), "it is a folder"], code=1)
    if roll < 0.2:  # a heads folder that is a file
        (d / "heads").write_text("not a folder")
        command = rng.choice(list(SAVE_STEPS))
        return Case("disk", f"{command} --heads-dir FILE", base_argv(command, base, d),
                    [str(d / "heads"), "a file stands where a folder"], code=1,
                    unchanged={str(d / "heads"): checksum(d / "heads")})
    if roll < 0.45:
        target = rng.choice(["part-", "_manifest.json"])
        return Case("disk", f"extract: full disk writing {target}", base_argv("extract", base, d),
                    [str(d / "cache" / "x"), "no space left on the device"], code=1, runner="disk",
                    must_not_exist=[str(d / "cache" / "x" / "_manifest.json")], extra={"target": target, "folder": str(d)})
    if roll < 0.8:
        command, target = rng.choice(list(SAVE_STEPS)), rng.choice(["heads.safetensors", "heads.json"])
        heads = copy(base.heads, d / "heads")
        return Case("disk", f"{command}: full disk writing {target}", base_argv(command, base, d),
                    [str(heads), "no space left on the device"], code=1, runner="disk",
                    unchanged=snapshot(heads), extra={"target": target, "folder": str(d)})
    command, target = rng.choice([("score", "scores.jsonl"), ("evaluate", "report.")])
    argv = base_argv(command, base, d)
    where = d / "scores.jsonl" if command == "score" else d / "eval"
    return Case("disk", f"{command}: full disk writing {target}", argv, [str(where), "no space left on the device"],
                code=1, runner="disk", must_not_exist=[str(d / "scores.jsonl"), str(d / "eval" / "report.json")],
                extra={"target": target, "folder": str(d)})


def run_disk_case(case: Case) -> tuple[int, str, list[str]]:
    """The case with every temporary file of a target named ``extra["target"]...`` a link to /dev/full."""
    import pipeline.atomic as A

    real = A.temp_path

    def onto_full_disk(path, kind="tmp"):
        tmp = real(path, kind)
        if kind == "tmp" and Path(path).name.startswith(case.extra["target"]):
            tmp.unlink(missing_ok=True)
            tmp.symlink_to("/dev/full")
        return tmp

    A.temp_path = onto_full_disk
    try:
        code, output, escaped = invoke(case.argv)
    finally:
        A.temp_path = real
    left = [f"left {p} behind" for p in Path(case.extra["folder"]).rglob(".*.tmp")]
    return code, output, judge(case, code, output, escaped) + left


if not Path("/dev/full").is_char_device():  # no full disk to give: those cases make no sense here
    raise SystemExit("the fuzzer's disk cases need /dev/full (Linux)")
WRITE_MAKERS = {"kill": kill_case, "writers": writers_case, "disk": disk_case}
WRITE_COUNTS = {"kill": 10, "writers": 3, "disk": 10}
RUNNERS = {"kill": run_kill_case, "writers": run_writers_case, "disk": run_disk_case}
OWN_PROCESSES = {"kill", "writers", "disk"}  # not run again through the real entry point (they need a hook)


# ----------------------------------------------------------------------------------------------
# Running and judging


MAKERS = {"data": data_case, "cache": cache_case, "heads": heads_case, "export": export_case,
          "preset": preset_case, "misspelt": misspelt_option_case, **WRITE_MAKERS}
COUNTS = {"data": 120, "cache": 110, "heads": 50, "export": 80, "preset": 30, "misspelt": 20, "option": 160,
          **WRITE_COUNTS}


# ----------------------------------------------------------------------------------------------
# Data without signal, caches of the wrong kind, manifests that disagree with their parts, a byte-order mark,
# missing paths (issue 22; self-contained: registered into MAKERS / COUNTS at the end of this block)


BOM = b"\xef\xbb\xbf"


def same_sides_rows(fmt: str, n: int) -> list[dict]:
    """``n`` pairs of one format whose chosen is identical to their rejected."""
    if fmt == "hh-rlhf":
        text = "\n\nHuman: What is 2 plus 2?\n\nAssistant: 4"
        return [{"chosen": text, "rejected": text} for _ in range(n)]
    if fmt == "trl-standard":
        return [{"prompt": f"Question {i}?", "chosen": "It is 4.", "rejected": "It is 4."} for i in range(n)]
    return [{"chosen": conversation(i, "It is 4."), "rejected": conversation(i, "It is 4.")} for i in range(n)]


def unrated_rows(fmt: str, n: int, rng: random.Random) -> list[dict]:
    """``n`` rating rows of one format, not one of them with a rating (missing, null or -100)."""
    if fmt == "nemo-regression":
        return [{"text": f"<extra_id_1>User\nQuestion {i}?\n<extra_id_1>Assistant\nIt is 4.\n<extra_id_2>",
                 "label": [-100] * 5} for i in range(n)]
    none = rng.choice([{}, {a: None for a in ATTRS}, {a: -100 for a in ATTRS}])
    return [{"prompt": f"Question {i}?", "response": "It is 4.", **none} for i in range(n)]


def write_rows(path: Path, rows: list[dict], bom: bool) -> Path:
    """Rows as JSON lines (``.jsonl``) or a JSON array (``.json``), with a UTF-8 byte-order mark in front if asked."""
    text = json.dumps(rows) if path.suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes((BOM if bom else b"") + text.encode("utf-8"))
    return path


def identical_feature_cache(base: Base, folder: Path, rng: random.Random) -> None:
    """A preference cache like the base's (same backbone, template, hidden size) whose pairs have the same
    features on both sides: only training can tell they carry no preference."""
    import numpy as np

    from pipeline.cache import CacheSpec, open_writer, read_manifest

    m = read_manifest(base.cache / "preferences")
    spec = CacheSpec(**{k: m[k] for k in ("backbone", "backbone_revision", "hidden_size", "storage_dtype", "max_length",
                                          "chat_template_hash", "dataset", "kind", "label_names")},
                     dataset_fingerprint="identical-sides", extra={})
    n = rng.randint(4, 24)
    emb = np.random.default_rng(rng.randrange(1 << 30)).standard_normal((n, m["hidden_size"])).astype(np.float32)
    with open_writer(folder, spec, n_parts=1) as w:
        w.write_part(0, {"id": [f"r{i}" for i in range(2 * n)], "source": "s", "n_tokens": np.ones(2 * n, np.int32),
                         "embedding": np.repeat(emb, 2, axis=0), "pair_id": [f"p{i // 2}" for i in range(2 * n)],
                         "role": ["chosen", "rejected"] * n, "labels": np.full((2 * n, 5), np.nan, np.float32)})
        w.finish(1)


def no_signal_case(base: Base, d: Path, rng: random.Random) -> Case:
    """Well-formed data that carries no signal: refused at extract (pairs all identical, ratings without a rating)
    or, for a cache of pairs with identical features, by train-gating, which leaves the heads as they were."""
    what = rng.choice(["identical pairs", "identical pairs", "no ratings", "no ratings", "identical features"])
    n = rng.randint(1, N_ROWS)
    path = d / f"nosignal{rng.choice(['.jsonl', '.json'])}"
    bom = rng.random() < 0.3
    if what == "identical pairs":
        fmt = rng.choice(["conversational", "trl-standard", "hh-rlhf"])
        write_rows(path, same_sides_rows(fmt, n), bom)
        argv = base_argv("extract", base, d, source=path, kind="preferences")
        return Case("nosignal", f"extract: {n} {fmt} pairs, chosen == rejected" + (" (BOM)" if bom else ""), argv,
                    [path.name, f"all {n} pairs have chosen identical to rejected"],
                    code=1, must_not_exist=[str(d / "cache/x/_manifest.json")])
    if what == "no ratings":
        fmt = rng.choice(["helpsteer2", "helpsteer2", "nemo-regression"])
        write_rows(path, unrated_rows(fmt, n, rng), bom)
        argv = base_argv("extract", base, d, source=path, kind="ratings")
        return Case("nosignal", f"extract: {n} {fmt} rows without a rating" + (" (BOM)" if bom else ""), argv,
                    [path.name, f"none of the {n} rows has a rating"], code=1,
                    must_not_exist=[str(d / "cache/x/_manifest.json")])
    identical_feature_cache(base, d / "cache" / "preferences", rng)
    heads = copy(base.heads, d / "heads")
    argv = base_argv("train-gating", base, d, cache=d / "cache")
    return Case("nosignal", "train-gating: pairs with identical features", argv,
                ["preferences", "identical chosen and rejected features"], code=1, unchanged=snapshot(heads))


KIND_OPTIONS = [  # (command, option, the kind the option takes)
    ("evaluate", "--eval-ratings", "ratings"), ("evaluate", "--eval-preferences", "preferences"),
    ("evaluate", "--shift-ratings", "ratings"), ("evaluate", "--train-ratings-cache", "ratings"),
    ("evaluate", "--train-preferences-cache", "preferences"), ("train-value-head", "--ratings-cache", "ratings"),
    ("train-gating", "--preferences-cache", "preferences"), ("train-heads", "--ratings-cache", "ratings"),
    ("train-heads", "--preferences-cache", "preferences"),
]


def wrong_kind_case(base: Base, d: Path, rng: random.Random) -> Case:
    """A cache of the other kind given to an option that names a cache: refused, naming the option."""
    command, option, kind = rng.choice(KIND_OPTIONS)
    other = "preferences" if kind == "ratings" else "ratings"
    wrong = str(base.cache / other)
    argv = base_argv(command, base, d)
    if option in argv:
        argv[argv.index(option) + 1] = wrong
    else:
        argv += [option, wrong]
    unchanged = snapshot(copy(base.heads, d / "heads")) if command == "train-gating" else {}
    return Case("kind", f"{command} {option} given a {other} cache", argv,
                [f"{option} {wrong}: a {other} cache, but {option} takes a {kind} cache"], code=1,
                must_not_exist=[] if unchanged else [str(d / "eval"), str(d / "heads")], unchanged=unchanged)


def manifest_parts_case(base: Base, d: Path, rng: random.Random) -> Case:
    """A manifest edited so that it disagrees with its parts while every size and checksum still agrees: its hidden
    size, dtype, labels, a part's row count, or (for cache info) its own list of columns."""
    cache = copy(base.cache, d / "cache")
    which = rng.choice(["ratings", "preferences"])
    folder = cache / which
    m = json.loads((folder / "_manifest.json").read_text())
    i = rng.randrange(len(m["parts"]))
    edits = {
        "hidden_size": lambda: m.update(hidden_size=rng.choice([v for v in (1, 8, 63, 65, 128, 4096)
                                                              if v != m["hidden_size"]])),
        "storage_dtype": lambda: m.update(storage_dtype="float16" if m["storage_dtype"] == "float32" else "float32"),
        "label_names": lambda: m.update(label_names=m["label_names"][:rng.randint(1, 4)]
                                        if rng.random() < 0.5 else m["label_names"] + ["extra"]),
        "rows": lambda: (m["parts"][i].update(rows=m["parts"][i]["rows"] + 1), m.update(rows=m["rows"] + 1)),
    }
    command = rng.choice(["cache info", "cache info", "train-heads", "evaluate",
                          "train-value-head" if which == "ratings" else "train-gating"])
    key = rng.choice(list(edits) + (["columns"] if command == "cache info" else []))
    if key == "columns":
        m["columns"]["embedding"] = f"fixed_size_list<element: float not null>[{m['hidden_size'] + 1}]"
    else:
        edits[key]()
    (folder / "_manifest.json").write_text(json.dumps(m))
    label = f"{command}: {which} manifest's {key} disagrees with its parts"
    if command == "cache info":
        named = "_manifest.json" if key == "columns" else (m["parts"][i]["file"] if key == "rows" else "part-00000")
        return Case("layout", label, ["cache", "info", str(folder)], ["DISAGREE", named], code=1)
    if command == "train-gating":
        heads = copy(base.heads, d / "heads")
        return Case("layout", label, base_argv(command, base, d, cache=cache), [which], code=1,
                    unchanged=snapshot(heads))
    out = d / ("eval" if command == "evaluate" else "heads")
    return Case("layout", label, base_argv(command, base, d, cache=cache), [which], code=1, must_not_exist=[str(out)])


def bom_case(base: Base, d: Path, rng: random.Random) -> Case:
    """A file saved with a UTF-8 byte-order mark is read: a damaged row in it is named by its own row and field
    (the mark is never the problem), in JSON lines and in a JSON array."""
    command = rng.choice(["extract ratings", "extract preferences", "score conversations", "score preferences"])
    fmt = command.split()[1]
    rows = [json.loads(line) for line in base.files[fmt].read_text().splitlines()]
    r = rng.choice([1, 1, rng.randint(2, N_ROWS)])  # the first row holds the mark
    what, damage, fieldname = row_damage(fmt, rng)
    damage(rows[r - 1])
    path = write_rows(d / f"bom-{fmt}{rng.choice(['.jsonl', '.json'])}", rows, bom=True)
    argv = base_argv(command.split()[0], base, d, source=path, kind=fmt, input=path)
    out = d / ("cache/x/_manifest.json" if command.startswith("extract") else "scores.jsonl")
    return Case("bom", f"{command}: BOM, row {r}: {what}", argv,
                [path.name, f"row {r}"] + ([fieldname] if fieldname else []), code=1, must_not_exist=[str(out)])


def missing_path_case(base: Base, d: Path, rng: random.Random) -> Case:
    """A local path that is not there, whatever its ending and slashes, is "file not found", never a hub dataset;
    only a bare ``org/name`` is tried as one (offline here), and its error says no such local file exists either."""
    u = f"no-such-{rng.randrange(1 << 40):x}"  # relative to the working directory: nothing there has this name
    path = rng.choice([f"{u}/nope.txt", f"{u}/nope.csv", f"{u}/sub/pairs.jsonl", f"./{u}.jsonl", f"{u}/x.json.gz",
                       f"{u}.txt", f"{u}/a/b", str(d / "nope.txt"), f"{u}/name"])
    command = rng.choice(["extract ratings", "extract preferences", "score conversations"])
    argv = base_argv(command.split()[0], base, d, source=path, kind=command.split()[1], input=Path(path))
    if command.startswith("score"):
        argv[argv.index("-i") + 1] = path  # as typed, not made absolute
    needles = [path, "no local file" if path == f"{u}/name" else "file not found"]
    out = d / ("cache/x/_manifest.json" if command.startswith("extract") else "scores.jsonl")
    return Case("missing", f"{command}: {path}", argv, needles, code=1, must_not_exist=[str(out)])


MAKERS.update({"nosignal": no_signal_case, "kind": wrong_kind_case, "layout": manifest_parts_case, "bom": bom_case,
               "missing": missing_path_case})
COUNTS.update({"nosignal": 40, "kind": 30, "layout": 40, "bom": 20, "missing": 25})


# ----------------------------------------------------------------------------------------------
# `urm curate` (issue 21; self-contained: registered into MAKERS / COUNTS at the end of this block): bad pair files,
# a damaged export, heads folder or preference cache, a cache of the wrong kind, bad options, an -o that is a file;
# OUT_DIR must not exist afterwards, or an OUT_DIR that was there must be as it was


def curate_argv(model: Path, source: Path | str, out: Path, *extra: str) -> list[str]:
    return ["curate", str(model), "-i", str(source), "--out-dir", str(out), "--device", "cpu", *extra]


def single_head(base: Base) -> Path:
    """Heads with one value head (no ensemble), trained once beside the base on its caches."""
    heads = base.root / "heads-single"
    if not (heads / "heads.json").is_file():
        must_pass(["train-heads", "--cache-dir", str(base.cache), "--heads-dir", str(heads), "--device", "cpu",
                   "--ensemble", "1", "--epochs", "1", "--gate-epochs", "1"])
    return heads


def response_rows(n: int) -> list[dict]:
    return [{"id": f"u{i}", "prompt": f"Question {i}: what is {i} plus {i}?",
             "responses": [f"It is {2 * i}.", f"It is {2 * i + 1}."]} for i in range(n)]


CURATE_OPTIONS = [  # (the flag, its bad value, what the error line must say besides the flag)
    ("--keep-certain", "0", []), ("--keep-certain", "1.5", []), ("--keep-certain", "nan", []),
    ("--keep-certain", "-0.1", []), ("--keep-certain", "abc", []), ("--suspect-threshold", "0.5", []),
    ("--suspect-threshold", "-1", []), ("--suspect-threshold", "0", []), ("--suspect-threshold", "inf", []),
    ("--signal", "gausian", ["did you mean 'gaussian'?"]), ("--signal", "BT", []), ("--signal", "", []),
    ("--select", "0", []), ("--select", "-3", []), ("--select", "2.5", []), ("--limit", "0", []),
    ("--max-tokens-per-batch", "0", []), ("--dtype", "bogus", []), ("--device", "tpu", []),
]


def curate_pairs_file(base: Base, d: Path, rng: random.Random) -> tuple[str, Path, list[str], list[str]]:
    """A bad input file: (what, the file, the options the command adds, needles)."""
    how = rng.choice(["damaged", "damaged", "conversations", "bom", "one response", "select labelled row damaged"])
    r = rng.randint(1, N_ROWS)
    if how == "damaged":  # the data class's damage to a preference file (malformed JSON, a bad row, empty, ...)
        path, what, needles = bad_data_file("preferences", base.files["preferences"], d, rng)
        return what, path, [], needles
    if how == "conversations":
        path = copy_file(base.files["conversations"], d / "conversations.jsonl")
        return "conversations, no pairs", path, [], [path.name, "no chosen/rejected pairs"]
    if how == "bom":
        rows = [json.loads(line) for line in base.files["preferences"].read_text().splitlines()]
        what, damage, fieldname = row_damage("preferences", rng)
        damage(rows[r - 1])
        path = write_rows(d / f"bom-pairs{rng.choice(['.jsonl', '.json'])}", rows, bom=True)
        return f"BOM, row {r}: {what}", path, [], [path.name, f"row {r}", fieldname]
    rows = response_rows(N_ROWS)
    if how == "one response":
        rows[r - 1]["responses"] = rng.choice([rows[r - 1]["responses"][:1], [], "It is 4.", None])
        path = write_jsonl(d / "unlabelled.jsonl", rows)
        got = rows[r - 1]["responses"]
        needles = [path.name, f"row {r}", "responses"]
        return f"--select, row {r}: responses = {got!r}", path, ["--select", "3"], needles
    rows = [json.loads(line) for line in base.files["preferences"].read_text().splitlines()]
    what, damage, fieldname = row_damage("preferences", rng)
    damage(rows[r - 1])
    path = write_jsonl(d / "pairs.jsonl", rows)
    return f"--select, labelled pairs, row {r}: {what}", path, ["--select", "3"], [path.name, f"row {r}", fieldname]


def copy_file(src: Path, dst: Path) -> Path:
    shutil.copyfile(src, dst)
    return dst


def curate_case(base: Base, d: Path, rng: random.Random) -> Case:
    """`urm curate` on one bad input, option or output path (the block's comment)."""
    out = d / "curated"
    pairs = base.files["preferences"]
    how = rng.choice(["file", "file", "file", "export", "heads", "cache", "kind", "option", "option", "option",
                      "rule", "ensemble", "output"])
    if how == "file":
        what, source, extra, needles = curate_pairs_file(base, d, rng)
        argv = curate_argv(base.export, source, out, *extra)
    elif how == "export":  # the export class's damage, curating a file through it (or its heads, a cache)
        damaged = export_case(base, d, rng)
        model, verify = d / "model", [a for a in damaged.argv if a == "--no-verify"]
        what, needles = damaged.label.split(": ", 1)[1], damaged.needles
        via_heads = damaged.label.startswith("evaluate")
        argv = curate_argv(model, base.cache / "preferences" if via_heads else pairs, out, *verify)
    elif how == "heads":
        heads = copy(base.heads, d / "heads")
        what, needles = heads_damage(heads, rng)
        what, argv = f"heads: {what}", curate_argv(heads, base.cache / "preferences", out)
    elif how == "cache":
        cache = copy(base.cache / "preferences", d / "preferences")
        what, needles, _ = cache_damage(cache, rng)
        if what == "manifest deleted":  # then not a cache: a folder given where a file of pairs goes
            needles = [cache.name, "not a file"]
        what, argv = f"preference cache: {what}", curate_argv(base.heads, cache, out)
    elif how == "kind":
        wrong = base.cache / "ratings"
        what, argv = "--input a ratings cache", curate_argv(rng.choice([base.heads, base.export]), wrong, out)
        needles = [f"--input {wrong}: a ratings cache, but --input takes a preferences cache"]
    elif how == "option":
        flag, value, needles = rng.choice(CURATE_OPTIONS)
        argv = curate_argv(base.export, pairs, out, flag, value)
        return Case("curate", f"{flag} {value!r}", argv, [flag, *needles], code=2, must_not_exist=[str(out)])
    elif how == "rule":
        n = str(rng.randint(1, 5))
        if rng.random() < 0.5:  # two rules at once: refused with the options, before any model loads
            unlabelled = write_jsonl(d / "unlabelled.jsonl", response_rows(4))
            argv = curate_argv(base.export, unlabelled, out, "--select", n, "--drop-suspect-only")
            return Case("curate", "--select with --drop-suspect-only", argv, ["--select", "--drop-suspect-only"],
                        code=2, must_not_exist=[str(out)])
        cache = base.cache / "preferences"
        return Case("curate", "--select on a preference cache", curate_argv(base.heads, cache, out, "--select", n),
                    [str(cache), "--select"], code=1, must_not_exist=[str(out)])
    elif how == "ensemble":
        heads = single_head(base)
        what = "--signal ensemble, heads without an ensemble"
        argv = curate_argv(heads, base.cache / "preferences", out, "--signal", "ensemble")
        needles = ["--signal ensemble needs an ensemble", str(heads)]
    else:  # a valid run whose --out-dir is a file, or is under one
        holder = d / "a-file"
        holder.write_text("not a folder\n")
        out = rng.choice([holder, holder / "curated"])
        what = f"--out-dir {'is a file' if out == holder else 'under a file'}"
        argv = curate_argv(base.export, pairs, out)
        needles = [str(out), "a file stands there" if out == holder else "a file stands where a folder"]
        return Case("curate", what, argv, needles, code=1, unchanged={str(holder): checksum(holder)},
                    must_not_exist=[] if out == holder else [str(out)])
    needles = [n for n in needles if n]  # a damaged row's field, where it has one
    if rng.random() < 0.3:  # an OUT_DIR from an earlier run: a failed one leaves it as it was
        out.mkdir()
        write_jsonl(out / "scored.jsonl", [{"id": "old", "p_chosen": 0.9}])
        (out / "report.md").write_text("# an earlier curation\n")
        return Case("curate", f"{what} (OUT_DIR there before)", argv, needles, unchanged=snapshot(out))
    return Case("curate", what, argv, needles, must_not_exist=[str(out)])


MAKERS["curate"] = curate_case
COUNTS["curate"] = 36


# ----------------------------------------------------------------------------------------------
# Issue 27 (self-contained: registered into MAKERS / COUNTS / RUNNERS at the end of this block): outputs that would
# replace an input or what the user has, odd output targets, blank keys, damaged published checkpoints, curate's
# stale caches and identical pairs, cache options named as typed, an export while a training writes the heads


def conversations_copy(base: Base, where: Path) -> Path:
    return copy_file(base.files["conversations"], where)


def outputs_case(base: Base, d: Path, rng: random.Random) -> Case:
    """An output path that names an input of the run, or a place the user's files are, or a device or system place:
    refused in one line naming the option and the path, with every file as it was (pipeline.outputs)."""
    how = rng.choice(["score into its input", "score inside the export", "score onto a device", "score into /proc",
                      "score over a file of mine", "curate into the input's folder", "curate over a folder of mine",
                      "evaluate around the heads", "evaluate over a folder of mine", "export inside the heads",
                      "export onto the backbone", "train inside the cache", "train into /sys", "extract into the backbone"])
    overwrite = ["--overwrite"] if rng.random() < 0.3 and how.split()[0] in ("score", "curate", "evaluate", "export") \
        and "mine" not in how else []
    if how == "score into its input":
        source = conversations_copy(base, d / "rows.jsonl")
        argv = [*base_argv("score", base, d, input=source)[:-4], "-o", str(source), "--device", "cpu", *overwrite]
        return Case("outputs", how, argv, [f"-o {source}: it is --input {source}", "an input of this run"], code=1,
                    unchanged={str(source): checksum(source)})
    if how == "score inside the export":
        model = copy(base.export, d / "model")
        out = model / "scores.jsonl"
        argv = [*base_argv("score", base, d, model=model)[:-4], "-o", str(out), "--device", "cpu", *overwrite]
        return Case("outputs", how, argv, [f"-o {out}: it is inside MODEL_DIR {model}"], code=1,
                    must_not_exist=[str(out)], unchanged=snapshot(model))
    if how == "score onto a device":  # a link to /dev/null: refused, the link (and the device) untouched
        link = d / "scores.jsonl"
        link.symlink_to(os.devnull)
        return Case("outputs", how, base_argv("score", base, d), [f"-o {link}: a device, pipe or socket"], code=1,
                    unchanged={str(link): f"link:{os.devnull}"})
    if how == "score into /proc":
        out = f"/proc/urm-fuzz-{rng.randrange(1 << 30)}.jsonl"
        argv = [*base_argv("score", base, d)[:-4], "-o", out, "--device", "cpu"]
        return Case("outputs", how, argv, [f"-o {out}: it is on the system's proc file system"], code=1)
    if how == "score over a file of mine":
        mine = d / "scores.jsonl"
        mine.write_text(rng.choice(["my notes\n", '{"id": 1}\n', "[1, 2]\n", "\x00binary"]))
        return Case("outputs", how, base_argv("score", base, d), [f"-o {mine}: a file is there", "--overwrite"],
                    code=1, unchanged={str(mine): checksum(mine)})
    if how.startswith("curate"):
        folder = d / "data"
        folder.mkdir()
        source = copy_file(base.files["preferences"], folder / "p.jsonl")
        (folder / "notes.txt").write_text("mine\n")
        if how == "curate into the input's folder":
            argv = curate_argv(base.export, source, folder, *overwrite)
            needles = [f"--out-dir {folder}: it holds --input {source}"]
        else:
            out = d / "out"
            out.mkdir()
            (out / rng.choice(["notes.txt", "scored.jsonl.bak", "data.parquet"])).write_text("mine\n")
            (out / "report.md").write_text("# an earlier curation\n")
            argv, needles, folder = curate_argv(base.export, source, out), [f"--out-dir {out}: the folder holds 1 entry",
                                                                             "--overwrite"], out
        return Case("outputs", how, argv, needles, code=1, unchanged=snapshot(folder))
    if how.startswith("evaluate"):
        run = d / "run"
        heads = copy(base.heads, run / "heads")
        argv = base_argv("evaluate", base, d, heads=heads)
        if how == "evaluate around the heads":
            argv[argv.index("--report-dir") + 1] = str(run)
            return Case("outputs", how, [*argv, *overwrite], [f"--report-dir {run}: it holds MODEL_DIR {heads}"],
                        code=1, unchanged=snapshot(heads))
        report = d / "eval"
        report.mkdir()
        (report / "mine.csv").write_text("a,b\n")
        return Case("outputs", how, argv, [f"--report-dir {report}: the folder holds 1 entry", "mine.csv"], code=1,
                    unchanged=snapshot(report))
    if how == "export inside the heads":
        heads = copy(base.heads, d / "heads")
        out = heads / "model"
        argv = ["export", "--backbone", str(base.backbone), "--heads-dir", str(heads), "--out-dir", str(out), *overwrite]
        return Case("outputs", how, argv, [f"--out-dir {out}: it is inside --heads-dir {heads}"], code=1,
                    must_not_exist=[str(out)], unchanged=snapshot(heads))
    if how == "export onto the backbone":
        backbone = copy(base.backbone, d / "backbone")
        argv = ["export", "--backbone", str(backbone), "--heads-dir", str(base.heads), "--out-dir", str(backbone),
                *overwrite]
        return Case("outputs", how, argv, [f"--out-dir {backbone}: it is --backbone {backbone}"], code=1,
                    unchanged=snapshot(backbone))
    if how == "train inside the cache":
        cache = copy(base.cache, d / "cache")
        command = rng.choice(["train-value-head", "train-heads"])
        argv = base_argv(command, base, d, cache=cache)
        heads = cache / "ratings" / "heads"
        argv[argv.index("--heads-dir") + 1] = str(heads)
        return Case("outputs", f"{command}: --heads-dir inside the ratings cache", argv,
                    [f"--heads-dir {heads}: it is inside --cache-dir {cache / 'ratings'}"], code=1,
                    must_not_exist=[str(heads)], unchanged=snapshot(cache / "ratings"))
    if how == "train into /sys":
        command = rng.choice(list(SAVE_STEPS))
        argv = base_argv(command, base, d)
        argv[argv.index("--heads-dir") + 1] = "/sys/urm-heads"
        return Case("outputs", f"{command} --heads-dir /sys/urm-heads", argv,
                    ["--heads-dir /sys/urm-heads: it is on the system's sysfs file system"], code=1)
    backbone = copy(base.backbone, d / "backbone")
    argv = base_argv("extract", base, d, cache=backbone)
    argv[argv.index("--backbone") + 1] = str(backbone)
    return Case("outputs", how, argv, [f"--cache-dir {backbone / 'x'}: it is inside --backbone"], code=1,
                must_not_exist=[str(backbone / "x")], unchanged=snapshot(backbone))


def oddplace_case(base: Base, d: Path, rng: random.Random) -> Case:
    """`-o .` for a folder written whole (run in the case's folder), and a stdout that is a full disk."""
    if rng.random() < 0.5:
        (d / "mine.txt").write_text("mine\n")
        command = rng.choice(["curate", "evaluate", "export"])
        if command == "curate":
            argv, flag = curate_argv(base.export, base.files["preferences"], Path(".")), "--out-dir"
        elif command == "evaluate":
            argv, flag = base_argv("evaluate", base, d), "--report-dir"
            argv[argv.index(flag) + 1] = "."
        else:
            argv, flag = base_argv("export", base, d), "--out-dir"
            argv[argv.index(flag) + 1] = "."
        return Case("oddplace", f"{command} {flag} .", [*argv, *(["--overwrite"] if rng.random() < 0.5 else [])],
                    [f"{flag} .: that is the folder this command runs in"], code=1,
                    unchanged={str(d / "mine.txt"): checksum(d / "mine.txt")}, runner="cwd", extra={"cwd": str(d)})
    argv = [a for a in base_argv("score", base, d)]
    i = argv.index("-o")
    argv = argv[:i] + argv[i + 2:]
    return Case("oddplace", "score to a stdout that is a full disk", argv,
                ["cannot write the scores to stdout: no space left on the device"], code=1, runner="stdout")


def run_cwd_case(case: Case) -> tuple[int, str, list[str]]:
    here = os.getcwd()
    os.chdir(case.extra["cwd"])
    try:
        code, output, escaped = invoke(case.argv)
    finally:
        os.chdir(here)
    return code, output, judge(case, code, output, escaped)


def run_stdout_case(case: Case) -> tuple[int, str, list[str]]:
    with open("/dev/full", "w") as full:
        done = subprocess.run([*urm_command(), *case.argv], stdout=full, stderr=subprocess.PIPE, text=True,
                              timeout=300, env=without_urm_env())
    problems = judge(case, done.returncode, done.stderr, None)
    if "Exception ignored" in done.stderr:
        problems.append("Python printed a second message at exit")
    return done.returncode, done.stderr, problems


def urm_command() -> list[str]:
    urm = Path(sys.executable).parent / "urm"
    return [str(urm)] if urm.exists() else [sys.executable, str(ROOT / "cli.py")]


def without_urm_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("URM_")}


KEY_MARK = "sk-fuzz-KEYMARK"  # a key's text: no message may show it


def keys_case(base: Base, d: Path, rng: random.Random) -> Case:
    """`urm serve` with an empty or blank key, from the environment or the option, or --open-health without a key:
    refused before the model loads (run as a process: if the server started, the case fails on a timeout)."""
    argv = ["serve", str(base.export), "--device", "cpu", "--port", "0"]
    how = rng.choice(["URM_API_KEY empty", "URM_API_KEY blank", "--api-key empty", "--api-key with a space",
                      "--open-health without a key"])
    env = {}
    if how == "URM_API_KEY empty":
        env["URM_API_KEY"] = ""
    elif how == "URM_API_KEY blank":
        env["URM_API_KEY"] = rng.choice([" ", "   ", "\t"])
    elif how == "--api-key empty":
        argv += ["--api-key", ""]
    elif how == "--api-key with a space":  # on the command line or in the environment: never shown
        key = f"{KEY_MARK} {rng.randrange(1000)}"
        if rng.random() < 0.5:
            argv += ["--api-key", key]
        else:
            env["URM_API_KEY"] = key
    else:
        return Case("keys", how, [*argv, "--open-health"], ["--open-health", "no key is set"], code=1, runner="serve")
    return Case("keys", how, argv, ["--api-key (or URM_API_KEY) must be a non-empty string"], code=2, runner="serve",
                extra={"env": env})


def run_serve_case(case: Case) -> tuple[int, str, list[str]]:
    env = {**without_urm_env(), **case.extra.get("env", {})}
    try:
        done = subprocess.run([*urm_command(), *case.argv], capture_output=True, text=True, timeout=120, env=env,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as e:
        return 0, str(e.stdout or ""), ["the server started (killed after 120 s): the bad key or option was taken"]
    output = done.stdout + done.stderr
    problems = judge(case, done.returncode, output, None)
    if KEY_MARK in output:
        problems.append("the key was shown")
    if "listening" in done.stdout:
        problems.append("the server started listening")
    return done.returncode, output, problems


def published_base(base: Base) -> Path:
    """A tiny checkpoint in the published URM layout, built once beside the base."""
    from tiny_models import build_published_checkpoint

    folder = base.root / "published"
    if not (folder / "model.safetensors").is_file():
        build_published_checkpoint(folder)
    return folder


def checkpoint_case(base: Base, d: Path, rng: random.Random) -> Case:
    """A published-layout checkpoint with a tensor missing, non-finite or of the wrong shape, or a wrong label
    count in config.json: `urm score` (or `urm curate`) refuses it in one line naming the tensor, scoring nothing."""
    import torch
    from safetensors.torch import load_file, save_file

    model = copy(published_base(base), d / "published")
    tensors = load_file(str(model / "model.safetensors"))
    config = json.loads((model / "config.json").read_text())
    heads = sorted(n for n in tensors if not n.startswith("model."))
    name = rng.choice(heads + [rng.choice(sorted(n for n in tensors if n.startswith("model.")))])
    how = rng.choice(["missing", "missing", "nan", "inf", "shape", "labels"])
    if how == "missing":
        tensors.pop(name)
        needles = [f"{name} not in its weight files"]
    elif how in ("nan", "inf"):
        t = tensors[name]
        t.view(-1)[rng.randrange(t.numel())] = float("nan") if how == "nan" else rng.choice([1, -1]) * float("inf")
        needles = [name, "holds NaN or infinite values"]
    elif how == "shape":
        t = tensors[name]
        shape = list(t.shape)
        shape[rng.randrange(len(shape))] += rng.choice([-1, 1, t.shape[0]])
        tensors[name] = torch.zeros(shape, dtype=t.dtype)
        needles = [f"{name} in model.safetensors has shape {shape}"]
    else:
        n = (len(config.get("id2label") or {}) or config["num_labels"]) + rng.choice([-4, -2, 2, 4])
        config.update(num_labels=n, id2label={str(i): f"LABEL_{i}" for i in range(n)},
                      label2id={f"LABEL_{i}": i for i in range(n)})
        name, needles = "config.json", ["score.weight in model.safetensors has shape", f"makes it [{n}, "]
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    (model / "config.json").write_text(json.dumps(config))
    if rng.random() < 0.25:
        argv = curate_argv(model, base.files["preferences"], d / "curated")
        return Case("checkpoint", f"curate: published checkpoint: {name} {how}", argv, [str(model), *needles], code=1,
                    must_not_exist=[str(d / "curated")])
    argv = base_argv("score", base, d, model=model)
    return Case("checkpoint", f"score: published checkpoint: {name} {how}", argv, [str(model), *needles], code=1,
                must_not_exist=[str(d / "scores.jsonl")])


def file_cache(base: Base) -> Path:
    """A preference cache extracted from the base's pair file (not a synthetic source), built once beside the base."""
    cache = base.root / "file-cache"
    if not (cache / "pairs" / "_manifest.json").is_file():
        must_pass(["extract", *extract_args(base.backbone, cache), "--source", str(base.files["preferences"]),
                   "--kind", "preferences", "--name", "pairs"])
    return cache / "pairs"


def stale_case(base: Base, d: Path, rng: random.Random) -> Case:
    """`urm curate` on a preference cache whose source file changed after extraction (a pair's sides swapped, a reply
    edited, a row dropped or added), or on a file whose every pair has chosen identical to rejected: refused."""
    if rng.random() < 0.25:
        n = rng.randint(1, N_ROWS)
        fmt = rng.choice(["conversational", "trl-standard", "hh-rlhf"])
        path = write_rows(d / "same.jsonl", same_sides_rows(fmt, n), bom=rng.random() < 0.3)
        return Case("stale", f"curate: {n} {fmt} pairs, chosen == rejected", curate_argv(base.export, path, d / "out"),
                    [path.name, f"all {n} pairs have chosen identical to rejected"], code=1,
                    must_not_exist=[str(d / "out")])
    (d / "src").mkdir()
    source = copy_file(base.files["preferences"], d / "src" / base.files["preferences"].name)  # same name, same ids
    cache = copy(file_cache(base), d / "pairs")
    m = json.loads((cache / "_manifest.json").read_text())
    m["dataset"] = str(source)
    m.setdefault("info", {}).setdefault("source_read", {})["source"] = str(source)
    (cache / "_manifest.json").write_text(json.dumps(m))
    rows = [json.loads(line) for line in source.read_text().splitlines()]
    r = rng.randrange(len(rows))
    how = rng.choice(["sides swapped", "reply edited", "row dropped", "row added"])
    if how == "sides swapped":
        rows[r]["chosen"], rows[r]["rejected"] = rows[r]["rejected"], rows[r]["chosen"]
    elif how == "reply edited":
        rows[r]["chosen"][-1]["content"] += rng.choice([" ", "!", " Really."])
    elif how == "row dropped":
        rows.pop(r)
    else:
        rows.append(rows[r])
    write_jsonl(source, rows)
    return Case("stale", f"curate: preference cache whose source had its row {r + 1} {how}",
                curate_argv(base.heads, cache, d / "out"), [str(cache), "is not what the cache was extracted from"],
                code=1, must_not_exist=[str(d / "out")])


def cachename_case(base: Base, d: Path, rng: random.Random) -> Case:
    """A cache option given a name that is nowhere: the error names the option and the name as typed."""
    command, option, _ = rng.choice(KIND_OPTIONS)
    wrong = rng.choice([f"nope-{rng.randrange(1 << 20):x}", f"sub/nope-{rng.randrange(1 << 20):x}"])
    argv = base_argv(command, base, d)
    if option in argv:
        argv[argv.index(option) + 1] = wrong
    else:
        argv += [option, wrong]
    unchanged = snapshot(copy(base.heads, d / "heads")) if command == "train-gating" else {}
    return Case("cachename", f"{command} {option} {wrong}", argv, [f"{option} {wrong}: no such cache"], code=1,
                must_not_exist=[] if unchanged else [str(d / "eval"), str(d / "heads")], unchanged=unchanged)


def exporting_case(base: Base, d: Path, rng: random.Random) -> Case:
    """`urm export` while a training (paused in its save, holding the heads folder) writes the heads: refused at once
    naming the training's pid, nothing exported; once the training is done, an export holds its heads whole."""
    trainer = rng.choice(list(SAVE_STEPS))
    heads = copy(base.heads, d / "heads")
    argv = ["export", "--backbone", str(base.backbone), "--heads-dir", str(heads), "--out-dir", str(d / "model")]
    return Case("exporting", f"export while {trainer} writes the heads", argv,
                [str(heads), "a training is writing these heads now"], code=1, runner="exporting",
                must_not_exist=[str(d / "model")], extra={"heads": str(heads), "first": base_argv(trainer, base, d)})


def run_exporting_case(case: Case) -> tuple[int, str, list[str]]:
    heads = Path(case.extra["heads"])
    first, go = training_held_at_its_save(case)
    if first is None:
        return 1, "", ["the training did not reach its save"]
    code, output, escaped = invoke(case.argv)
    case.needles.append(f"(process {first})")
    problems = judge(case, code, output, escaped)
    go.touch()
    _, status = os.waitpid(first, 0)
    if exit_code(status) != 0:
        problems.append(f"the training ended with exit {exit_code(status)}, not 0")
    again, output2, escaped2 = invoke(case.argv)
    out = Path(case.argv[case.argv.index("--out-dir") + 1])
    if again != 0 or escaped2:
        problems.append(f"the export after the training failed: {output2[-300:]}")
    else:
        config = json.loads((out / "config.json").read_text())["urm"]
        meta = json.loads((heads / "heads.json").read_text())
        if (out / "heads.json").read_bytes() != (heads / "heads.json").read_bytes() or \
                (out / "urm-heads.safetensors").read_bytes() != (heads / "heads.safetensors").read_bytes():
            problems.append("the export's heads pair is not the folder's")
        if config.get("gate") != meta["architecture"].get("gate") or config.get("members") != \
                meta["architecture"].get("members"):
            problems.append("the export's config.json describes other heads than its tensors")
    return code, output, problems


MAKERS.update({"outputs": outputs_case, "oddplace": oddplace_case, "keys": keys_case, "checkpoint": checkpoint_case,
               "stale": stale_case, "cachename": cachename_case, "exporting": exporting_case})
COUNTS.update({"outputs": 42, "oddplace": 8, "keys": 10, "checkpoint": 24, "stale": 16, "cachename": 12,
               "exporting": 4})
RUNNERS.update({"cwd": run_cwd_case, "stdout": run_stdout_case, "serve": run_serve_case,
                "exporting": run_exporting_case})
OWN_PROCESSES |= {"oddplace", "keys", "exporting"}


def make_case(base: Base, d: Path, kind: str, seed: float, spec=None) -> Case:
    """The case ``kind`` #``seed`` built in the fresh folder ``d`` (the same seed makes the same case)."""
    d.mkdir(parents=True)
    rng = random.Random(seed)
    case = option_case(base, d, rng, spec) if kind == "option" else MAKERS[kind](base, d, rng)
    case.seed = seed
    return case


def plan(base: Base, seed: int, scale: float) -> list[tuple[str, float, tuple | None]]:
    """(kind, case seed, option spec) of every case, in a fixed order."""
    rng = random.Random(seed)
    todo = []
    for kind, n in COUNTS.items():
        if kind == "option":
            specs = option_cases(base)
            todo += [("option", rng.random(), spec) for spec in rng.sample(specs, min(len(specs), round(n * scale)))]
        else:
            todo += [(kind, rng.random(), None) for _ in range(max(1, round(n * scale)))]
    return todo


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(("error: ", "Error: "))]


def judge(case: Case, code: int, output: str, escaped: BaseException | None) -> list[str]:
    """What is wrong with this outcome (empty: the case passed)."""
    problems = []
    if escaped is not None:
        problems.append(f"an exception escaped: {type(escaped).__name__}: {escaped}")
    if "Traceback" in output:
        problems.append("a traceback was printed")
    if case.kind == "repair":
        if code != 0:
            problems.append(f"exit {code}: extract did not rebuild the damaged part")
        for name, expected in case.repair.items():
            path = Path(case.argv[case.argv.index("--cache-dir") + 1]) / "ratings" / name
            if not path.is_file() or checksum(path) != expected:
                problems.append(f"{name} is not the original part after the rebuild")
        return problems
    if code == 0:
        problems.append("exit 0: the command accepted the bad input")
    elif case.code is not None and code != case.code:
        problems.append(f"exit {code}, expected {case.code}")
    lines = error_lines(output)
    if len(lines) != 1:
        problems.append(f"{len(lines)} error lines, expected 1")
    elif missing := [n for n in case.needles if n not in lines[0]]:
        problems.append(f"the error line does not name {missing}")
    for path in map(Path, case.must_not_exist):
        if path.name == "_manifest.json" and path.is_file() and not json.loads(path.read_text()).get("complete"):
            continue  # an incomplete cache: the next extract resumes it, nothing uses it before
        if path.exists():
            problems.append(f"left {path} behind")
    for path, expected in case.unchanged.items():
        p = Path(path)
        now = f"link:{os.readlink(p)}" if p.is_symlink() else checksum(p) if p.is_file() else None
        if now != expected:
            problems.append(f"changed {path}")
    return problems


def run_in_process(case: Case) -> dict:
    t0 = time.perf_counter()
    if case.runner:
        code, output, problems = RUNNERS[case.runner](case)
    else:
        code, output, escaped = invoke(case.argv)
        problems = judge(case, code, output, escaped)
    return {**asdict(case), "exit": code, "output": output[-2000:], "seconds": round(time.perf_counter() - t0, 3),
            "problems": problems}


def run_as_process(case: Case, in_process: dict, here: Path, there: Path) -> list[str]:
    """The same case (made in the folder ``here``; the in-process run's was ``there``) through the real entry
    point: the same exit code, the same one error line on stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("URM_")}
    urm = Path(sys.executable).parent / "urm"
    command = [str(urm)] if urm.exists() else [sys.executable, str(ROOT / "cli.py")]
    done = subprocess.run([*command, *case.argv], capture_output=True, text=True, env=env, timeout=300)
    problems = []
    if done.returncode != in_process["exit"]:
        problems.append(f"as a process: exit {done.returncode}, in process {in_process['exit']}")
    if "Traceback" in done.stderr + done.stdout:
        problems.append("as a process: a traceback was printed")
    lines = [line.replace(str(here), str(there)) for line in error_lines(done.stderr)]
    if case.kind != "repair" and (len(lines) != 1 or lines != error_lines(in_process["output"])):
        problems.append(f"as a process: error lines {lines} differ from the in-process run's")
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="Multiply the number of cases per class.")
    parser.add_argument("--processes", type=int, default=24, help="Cases also run as real `urm` processes.")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--kinds", default=None, help="Only these classes (comma-separated), e.g. kill,disk.")
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    t0 = time.perf_counter()
    base = build_base(args.workdir / "base")
    built = time.perf_counter() - t0
    todo = plan(base, args.seed, args.scale)
    if args.kinds:
        todo = [t for t in todo if t[0] in args.kinds.split(",")]
    results = []
    for i, (kind, seed, spec) in enumerate(todo):
        results.append(run_in_process(make_case(base, args.workdir / "cases" / f"{i:04d}", kind, seed, spec)))
    rng = random.Random(args.seed + 1)
    plain = [i for i, (kind, _, _) in enumerate(todo) if kind not in OWN_PROCESSES]  # the others run their own way
    for i in sorted(rng.sample(plain, min(args.processes, len(plain)))):
        kind, seed, spec = todo[i]  # the same case again, on its own fresh folder
        here, there = args.workdir / "processes" / f"{i:04d}", args.workdir / "cases" / f"{i:04d}"
        results[i]["as_process"] = run_as_process(make_case(base, here, kind, seed, spec), results[i], here, there)
        results[i]["problems"] += results[i]["as_process"]
    counts, failed = {}, {}
    for r in results:
        counts[r["kind"]] = counts.get(r["kind"], 0) + 1
        if r["problems"]:
            failed[r["kind"]] = failed.get(r["kind"], 0) + 1
    report = {"seed": args.seed, "cases": len(results), "counts": counts, "failed": failed,
              "as_process": sum("as_process" in r for r in results), "base_seconds": round(built, 1),
              "seconds": round(time.perf_counter() - t0, 1), "results": results}
    if args.report:
        args.report.write_text(json.dumps(report, indent=1, default=str))
    for r in results:
        if r["problems"]:
            print(f"FAIL [{r['kind']}] {r['label']}\n  urm {' '.join(r['argv'])}\n  " + "\n  ".join(r["problems"])
                  + "\n  output: " + r["output"].strip().replace("\n", "\n          "))
    print(f"{len(results)} cases ({', '.join(f'{k} {v}' for k, v in counts.items())}), "
          f"{sum(failed.values())} failed, {report['as_process']} also run as processes, in {report['seconds']} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
