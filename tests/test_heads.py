"""The heads (docs/method.md 1, 4): layout, score math, gates, and the heads folder round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.model import (CacheIdentity, Heads, HeadsError, SoftmaxGate, ValueEnsemble, load_heads, p_chosen_bt,
                            p_chosen_gaussian, save_heads, score, score_variance, split_mean_logstd, unstandardize,
                            urm_gate)
from tiny_models import heads_meta


def test_split_is_interleaved():
    out = torch.tensor([[10.0, 0.1, 20.0, 0.2, 30.0, 0.3]])  # (mu_1, s_1, mu_2, s_2, mu_3, s_3)
    mu, log_sigma = split_mean_logstd(out)
    assert mu.tolist() == [[10.0, 20.0, 30.0]]
    assert log_sigma[0].tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_score_variance_and_pair_probabilities_by_hand():
    w, mu, sigma = torch.tensor([[0.5, 2.0]]), torch.tensor([[4.0, -1.0]]), torch.tensor([[2.0, 0.5]])
    assert score(w, mu).item() == pytest.approx(0.5 * 4 - 2)
    assert score_variance(w, sigma).item() == pytest.approx(0.25 * 4 + 4 * 0.25)
    assert p_chosen_bt(torch.tensor(1.0), torch.tensor(0.0)).item() == pytest.approx(1 / (1 + math.exp(-1)))
    phi = 0.5 * (1 + math.erf((1.0 / math.sqrt(3.0 + 1.0)) / math.sqrt(2)))  # Phi(1 / sqrt(4))
    got = p_chosen_gaussian(torch.tensor(1.5), torch.tensor(0.5), torch.tensor(3.0), torch.tensor(1.0))
    assert got.item() == pytest.approx(phi, rel=1e-6)


def test_parameter_names_are_the_export_names():
    urm = Heads(8, 5, members=3, gate="urm", gate_hidden=6)
    shapes = {name: tuple(t.shape) for name, t in urm.state_dict().items()}
    assert shapes == {"score.weight": (10, 8), "ensemble.weight": (3, 10, 8),
                      "weights.fc.0.weight": (6, 8), "weights.fc.0.bias": (6,),
                      "weights.fc.2.weight": (6, 6), "weights.fc.2.bias": (6,),
                      "weights.fc.4.weight": (5, 6), "weights.fc.4.bias": (5,)}
    assert isinstance(urm.weights[1], torch.nn.SELU) and isinstance(urm.weights[3], torch.nn.SELU)
    assert urm_gate(8, 5)[0].out_features == 8  # default hidden width = d
    # heads saved before the gate's layers were nested under "fc" (weights.{0,2,4}.*) load the same
    unnested = {k.replace("weights.fc.", "weights."): v for k, v in urm.state_dict().items()}
    again = Heads(8, 5, members=3, gate="urm", gate_hidden=6)
    again.load_state_dict(unnested)
    h = torch.randn(4, 8)
    assert torch.equal(again(h)["score"], urm(h)["score"])
    soft = Heads(8, 5, gate="softmax", bias=True)
    names = set(soft.state_dict())
    assert {"score.weight", "score.bias", "softmax_gate.scale"} <= names
    assert all(n.startswith(("score.", "softmax_gate.")) for n in names)
    assert soft.softmax_gate.layers[0].out_features == 1024  # ArmoRM's hidden width


def test_softmax_is_over_the_attribute_axis():
    torch.manual_seed(0)
    gate = SoftmaxGate(8, 5, hidden=16, temperature=0.5)
    with torch.no_grad():
        gate.scale.fill_(3.0)
    w = gate(torch.randn(7, 8) * 5)
    assert w.shape == (7, 5)
    assert torch.allclose(w.sum(-1), torch.full((7,), 3.0))  # each row sums to the scale
    assert (w.std(0) > 0).all()  # not the same weights for every row


def test_heads_forward_is_the_method_math():
    torch.manual_seed(0)
    heads = Heads(6, 3, gate="urm", gate_hidden=4)
    h = torch.randn(5, 6)
    out = heads(h)
    raw = h @ heads.score.weight.T
    mu, sigma = raw[:, 0::2], raw[:, 1::2].exp()
    w = heads.weights(h)
    assert torch.allclose(out["attribute_means"], mu) and torch.allclose(out["attribute_stds"], sigma)
    assert torch.equal(out["gating_weights"], w)
    assert torch.allclose(out["score"], (w * mu).sum(-1))
    assert torch.allclose(out["score_std"], (w ** 2 * sigma ** 2).sum(-1).sqrt())
    assert "ensemble_scores" not in out
    plain = Heads(6, 3)(h)  # no gate yet: equal weights 1/K
    assert torch.allclose(plain["gating_weights"], torch.full((5, 3), 1 / 3))


def test_ensemble_mean_head_and_spread():
    torch.manual_seed(0)
    heads = Heads(6, 3, members=4)
    with torch.no_grad():
        heads.ensemble.weight.normal_()
        heads.score.weight.copy_(heads.ensemble.weight.mean(0))
    h = torch.randn(5, 6)
    out = heads(h)
    members = torch.stack([(h @ W.T)[:, 0::2].mean(-1) for W in heads.ensemble.weight], -1)  # w = 1/3
    assert out["ensemble_scores"].shape == (5, 4)
    assert torch.allclose(out["ensemble_scores"], members, atol=1e-5)
    assert torch.allclose(out["ensemble_std"], members.std(-1), atol=1e-5)
    assert torch.allclose(out["score"], members.mean(-1), atol=1e-5)  # linear head: mean of weights


def test_value_ensemble_takes_shared_or_per_member_batches():
    model = ValueEnsemble(4, 2, members=3, bias=True,
                          generators=[torch.Generator().manual_seed(s) for s in range(3)])
    assert not torch.equal(model.weight[0], model.weight[1])
    h = torch.randn(5, 4)
    shared = model(h)
    per_member = model(h.expand(3, 5, 4))
    assert shared.shape == (3, 5, 4) and torch.allclose(shared, per_member)
    assert torch.allclose(shared[1], h @ model.weight[1].T + model.bias[1])


def test_unstandardize_folds_the_label_scaling():
    torch.manual_seed(0)
    weight, bias = torch.randn(6, 4), torch.randn(6)
    mean, std = torch.tensor([2.0, 1.0, 3.0]), torch.tensor([0.5, 2.0, 1.5])
    h = torch.randn(7, 4)
    mu, log_sigma = split_mean_logstd(h @ weight.T + bias)
    w2, b2 = unstandardize(weight, bias, mean, std)
    mu2, log_sigma2 = split_mean_logstd(h @ w2.T + b2)
    assert torch.allclose(mu2, mu * std + mean, atol=1e-5)
    assert torch.allclose(log_sigma2, log_sigma + std.log(), atol=1e-6)


@pytest.mark.parametrize("gate", [None, "urm", "softmax"])
def test_heads_folder_round_trip(tmp_path, gate):
    torch.manual_seed(0)
    heads = Heads(8, 5, members=2, bias=gate == "softmax", gate=gate, gate_hidden=6, temperature=2.0)
    meta = heads_meta(heads, CacheIdentity("cache/x"))
    meta.value_head.val["nll"] = math.nan
    save_heads(tmp_path, heads, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["heads.json", "heads.safetensors"]  # no .tmp left
    saved = json.loads((tmp_path / "heads.json").read_text())  # strict JSON: NaN saved as null
    assert saved["value_head"]["val"]["nll"] is None and saved["hidden_size"] == 8
    assert saved["architecture"]["gate"] == gate
    loaded, loaded_meta = load_heads(tmp_path)
    assert loaded_meta.architecture == heads.architecture and loaded_meta.value_head.cache.path == "cache/x"
    h = torch.randn(3, 8)
    a, b = heads(h), loaded(h)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_posterior_round_trips_and_heads_saved_before_it_load_without_one(tmp_path):
    """The ridge posterior's buffers go through the heads folder (epistemic_std the same after loading); a heads.json
    written before the posterior was kept (no "posterior" in its architecture) loads and scores, stating none."""
    from tiny_models import RANDOM_POSTERIOR, random_posterior_

    torch.manual_seed(0)
    heads = Heads(8, 5, members=2, gate="urm", gate_hidden=6, posterior=RANDOM_POSTERIOR)
    random_posterior_(heads)
    save_heads(tmp_path / "new", heads, heads_meta(heads, CacheIdentity("cache/x")))
    loaded, meta = load_heads(tmp_path / "new")
    assert meta.architecture["posterior"] == RANDOM_POSTERIOR
    h = torch.randn(3, 8)
    assert torch.equal(loaded(h)["epistemic_std"], heads(h)["epistemic_std"])
    assert torch.equal(loaded(h)["attribute_epistemic_stds"], heads(h)["attribute_epistemic_stds"])
    old = Heads(8, 5, members=2, gate="urm", gate_hidden=6)
    save_heads(tmp_path / "old", old, heads_meta(old, CacheIdentity("cache/x")))
    data = json.loads((tmp_path / "old" / "heads.json").read_text())
    del data["architecture"]["posterior"]  # as heads.json was written before the key existed
    (tmp_path / "old" / "heads.json").write_text(json.dumps(data))
    loaded, _ = load_heads(tmp_path / "old")
    out = loaded(h)
    assert "epistemic_std" not in out and "attribute_epistemic_stds" not in out
    assert torch.equal(out["score"], old(h)["score"])


def test_missing_heads_folder_says_what_to_run(tmp_path):
    with pytest.raises(HeadsError, match="urm train-value-head"):
        load_heads(tmp_path / "nothing")
