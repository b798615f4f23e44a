"""Out-of-core training: the streamed minibatch source gives the same heads as features held in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import ATTRIBUTES
from pipeline.cache import CacheSpec, open_writer, read_features, read_pairs, row_index
from pipeline.configs import ConfigError, GatingConfig, TrainingRun, ValueHeadConfig, build
from pipeline.model import load_heads
from pipeline.recipes.train import train_gating, train_value_head
from pipeline.train import TensorRows, feature_stream, fit_gate, fit_value_head, open_streamed, part_shuffled
from test_train import identity_value_head, prompt_dependent_pairs

K = len(ATTRIBUTES)


def write_parts(path, embedding, labels=None, pair_of=None, part_rows=50):
    """A cache of several parts with the real writer; ``pair_of[i]`` = (pair index, role) of row i for pairs."""
    kind = "ratings" if pair_of is None else "preferences"
    spec = CacheSpec(backbone="tiny/backbone", backbone_revision="r0", hidden_size=embedding.shape[1],
                     storage_dtype="float16", max_length=64, chat_template_hash="tmpl-0",
                     dataset=f"synthetic-{kind}", dataset_fingerprint="fp", kind=kind)
    writer = open_writer(path, spec)
    n_parts = 0
    for n_parts, i in enumerate(range(0, len(embedding), part_rows), start=1):
        rows = slice(i, i + part_rows)
        extra = {} if pair_of is None else dict(pair_id=[f"p{p}" for p, _ in pair_of[rows]],
                                                 role=[r for _, r in pair_of[rows]],
                                                 margin=np.linspace(0, 1, len(embedding))[rows].astype(np.float32))
        writer.write_part(n_parts - 1, dict(id=[str(j) for j in range(i, i + len(embedding[rows]))],
                                            source="synthetic", n_tokens=np.full(len(embedding[rows]), 10, np.int32),
                                            embedding=embedding[rows], labels=None if labels is None else labels[rows],
                                            **extra))
    writer.finish(n_parts)
    return str(path)


@pytest.fixture
def ratings_cache(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(430, 16, generator=g).half()
    y = (x[:, 1:1 + K].float() * 2 + 0.3 * torch.randn(430, K, generator=g)).clamp(-4, 4)
    y[::7, 2] = float("nan")  # missing labels stream too
    return write_parts(tmp_path / "ratings", x, y, part_rows=64)


@pytest.fixture
def pairs_cache(tmp_path):
    """300 pairs whose rows are scattered over 6 parts: a pair's two rows often lie in different parts."""
    chosen, rejected = prompt_dependent_pairs(n=300)
    rows = torch.cat([chosen, rejected])
    pair_of = np.array([(i, "chosen") for i in range(300)] + [(i, "rejected") for i in range(300)], dtype=object)
    perm = np.random.default_rng(0).permutation(600)
    return write_parts(tmp_path / "preferences", rows[perm], pair_of=pair_of[perm], part_rows=100)


def in_memory(path, pairs):
    """The recipe's in-memory source: features read whole, each sample's part for the order."""
    _, starts, index, _ = row_index(path, pairs=pairs)
    part = torch.from_numpy(np.searchsorted(starts, index[0], side="right") - 1)
    if pairs:
        p = read_pairs(path)
        return TensorRows(p.chosen.embedding, p.rejected.embedding, part=part), p.chosen.margin
    f = read_features(path)
    return TensorRows(f.embedding, part=part), f.labels


def assert_same_fit(a, b):
    sa, sb = a.heads.state_dict(), b.heads.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    drop = ("seconds", "examples_per_s", "pairs_per_s")
    assert [{k: v for k, v in h.items() if k not in drop} for h in a.history] == \
           [{k: v for k, v in h.items() if k not in drop} for h in b.history]
    assert a.val == b.val


def test_part_shuffled_visits_the_parts_a_window_at_a_time_in_one_order_for_every_member():
    part = torch.arange(100) // 10  # 10 parts of 10
    rows = torch.arange(100)[torch.arange(100) % 3 != 0]  # a training subset
    gens = [torch.Generator().manual_seed(m) for m in range(3)]
    by_part = part_shuffled(rows, part, gens, torch.Generator().manual_seed(9), window=1)
    assert by_part.shape == (3, len(rows))
    for member in by_part:
        assert sorted(member.tolist()) == rows.tolist()
        assert len(torch.unique_consecutive(part[member])) == 10  # each part's rows together
    assert (part[by_part] == part[by_part[0]]).all()  # the same part sequence for every member
    assert not torch.equal(by_part[0], by_part[1])  # each member its own shuffle within a part
    every = torch.arange(100)
    windows = part_shuffled(every, part, gens, torch.Generator().manual_seed(9), window=4)  # 4 + 4 + 2 parts
    spans = ((0, 40), (40, 80), (80, 100))
    for member in windows:
        assert sorted(member.tolist()) == every.tolist()
        sets = [set(part[member[a:b]].tolist()) for a, b in spans]
        assert [len(x) for x in sets] == [4, 4, 2] and set.union(*sets) == set(range(10))
        assert sets == [set(part[windows[0][a:b]].tolist()) for a, b in spans]  # the same windows for all
        assert len(torch.unique_consecutive(part[member])) > 10  # a window's parts mixed
    # one part (or none): a plain shuffle, rows[randperm(n)], as before parts existed
    g = [torch.Generator().manual_seed(5)]
    plain = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(5))]
    assert torch.equal(part_shuffled(rows, None, g, g[0])[0], plain)


@pytest.fixture(autouse=True)
def small_windows(monkeypatch):
    """Two parts a window, so that the caches below (7 and 6 parts) span several windows."""
    monkeypatch.setattr(feature_stream, "PARTS_PER_WINDOW", 2)


def test_streamed_stage1_equals_in_memory(ratings_cache):
    cfg = build(ValueHeadConfig, dict(loss="reparam", ensemble=2, epochs=4, batch_size=40, lr=1e-2, device="cpu"))
    memory, labels = in_memory(ratings_cache, pairs=False)
    streamed, s_labels, _ = open_streamed(ratings_cache, pairs=False)
    assert torch.equal(labels.nan_to_num(9), s_labels.nan_to_num(9)) and labels.isnan().any()
    a = fit_value_head(memory, labels, cfg)
    b = fit_value_head(streamed, s_labels, cfg)
    assert_same_fit(a, b)
    assert len(torch.unique(memory.part)) == 7 and a.val["pearson"] > 0.5  # it learnt something, over 7 parts


def test_streamed_epoch_reads_each_training_row_once(ratings_cache):
    streamed, _, _ = open_streamed(ratings_cache, pairs=False)
    train = torch.arange(0, streamed.n, 2)
    order = part_shuffled(train, streamed.part, [torch.Generator().manual_seed(1)], torch.Generator())
    seen = [idx for idx, _ in streamed.batches(order, 30)]
    assert torch.equal(torch.cat(seen, 1), order)
    assert streamed.reads == len(train)  # each part read once, only its training rows
    full = read_features(ratings_cache).embedding
    idx, (x,) = next(iter(streamed.batches(order, 30)))
    assert torch.equal(x, full[idx])


def test_streamed_stage2_equals_in_memory(pairs_cache):
    cfg = build(GatingConfig, dict(gate="urm", gate_hidden=32, gate_epochs=3, gate_batch_size=64, gate_lr=1e-2,
                                   use_margin=True, device="cpu"))
    memory, margin = in_memory(pairs_cache, pairs=True)
    streamed, _, s_margin = open_streamed(pairs_cache, pairs=True)
    assert torch.equal(margin, s_margin)
    a = fit_gate(memory, None, identity_value_head(), cfg, margin=margin)
    b = fit_gate(streamed, None, identity_value_head(), cfg, margin=s_margin)
    assert_same_fit(a, b)
    assert a.val["accuracy"] > a.val["equal_weights"]["accuracy"]


def test_recipe_streams_over_the_budget_and_saves_the_same_heads(ratings_cache, pairs_cache, tmp_path, said, caplog):
    heads = {}
    for name, budget in (("memory", None), ("streamed", 1e-6)):
        caplog.clear()
        common = dict(heads_dir=str(tmp_path / name), device="cpu", memory_budget=budget)
        train_value_head(build(ValueHeadConfig, dict(ratings_cache=ratings_cache, epochs=3, **common)))
        train_gating(build(GatingConfig, dict(preferences_cache=pairs_cache, gate_hidden=16, gate_epochs=2,
                                              **common)))
        lines = said()
        streaming = [line for line in lines if "exceed the memory budget" in line]
        assert len(streaming) == (2 if budget else 0), lines
        heads[name] = load_heads(tmp_path / name)[0].state_dict()
    assert all(torch.equal(heads["memory"][k], heads["streamed"][k]) for k in heads["memory"])


@pytest.mark.parametrize("budget", [0, -1.0, float("nan")])
def test_memory_budget_must_be_positive(budget):
    with pytest.raises(ConfigError, match="--memory-budget"):
        TrainingRun(memory_budget=budget)
