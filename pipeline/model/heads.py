"""The reward heads on a last-token hidden state h, and the score math (docs/method.md 1, 4).

The one scoring module: training and `urm score` import it from this package, and `urm export`
copies this file into every export, where ``modeling_urm.py`` imports it as a sibling file of the
model repo. So it imports only torch.

Parameter names are the export's tensor names: ``score.weight`` [2K, d] (rows interleaved
mu_1, s_1, mu_2, s_2, ...), ``ensemble.weight`` [M, 2K, d] for an ensemble, ``weights.fc.*`` for the
URM gate (the published checkpoint's names), ``softmax_gate.*`` for the ArmoRM-style gate, and
``posterior.{g}.*`` for the closed-form ridge posterior of a label group's attributes (frozen, docs/method.md 10).
``build_heads`` gives any module these submodules (``Heads`` here, ``URMForSequenceClassification``
in an export) and ``head_outputs`` is the whole score math on them, under the output names used
everywhere (``OUTPUTS``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATES = ("urm", "softmax")
SOFTMAX_GATE_HIDDEN = 1024  # ArmoRM's GatingNetwork: hidden_dim=1024, n_hidden=3, bias, T=10
SOFTMAX_GATE_LAYERS = 3
SOFTMAX_GATE_TEMPERATURE = 10.0
# What the heads say about each row, in this order ([B] or [B, K] / [B, M]); an exported model
# returns the same names, with the score as ``logits`` [B, 1] (the Hugging Face convention).
# score_std / attribute_stds are aleatoric (the ratings' noise); ensemble_std and epistemic_std /
# attribute_epistemic_stds are epistemic (what the training rows left open): the latter only where the heads carry
# a ridge posterior (``posterior``, the closed-form value head), absent otherwise.
OUTPUTS = ("score", "score_std", "attribute_means", "attribute_stds", "gating_weights",
           "ensemble_scores", "ensemble_std", "epistemic_std", "attribute_epistemic_stds")
VALUE_PREFIXES = ("score.", "ensemble.", "posterior.")  # the value head's tensors (the gate's are the rest)


# ----------------------------------------------------------------------------------------------
# Pure functions (docs/method.md 1, 5)


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of the last 1 in each row of the mask: right or left padding, holes allowed.

    h is read there, never at a position found from the pad id (which may equal EOS, docs/method.md 5).
    """
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.to(positions.dtype) * positions).argmax(dim=1)


def split_mean_logstd(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Interleaved value-head output [..., 2K] -> (mu [..., K], log_sigma [..., K])."""
    return out[..., 0::2], out[..., 1::2]


def score(w: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """s = sum_k w_k mu_k."""
    return (w * mu).sum(-1)


def score_variance(w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Var s = sum_k w_k^2 sigma_k^2 (attributes treated as independent)."""
    return (w.square() * sigma.square()).sum(-1)


def p_chosen_bt(s_a: torch.Tensor, s_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """P(A > B) under Bradley-Terry: sigmoid((s_A - s_B) / T), T fitted on validation pairs (docs/method.md 2)."""
    return torch.sigmoid((s_a - s_b) / temperature)


def p_chosen_gaussian(s_a, s_b, var_a, var_b, temperature: float = 1.0) -> torch.Tensor:
    """P(A > B) under independent Gaussian scores: Phi((s_A - s_B) / (T sqrt(Var_A + Var_B)))."""
    return torch.special.ndtr((s_a - s_b) / (temperature * torch.sqrt(var_a + var_b)))


def unstandardize(weight, bias, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold label standardisation into a value head trained on (y - mean) / std (docs/method.md 2).

    mu = std * (W_mu h + b_mu) + mean and log sigma = (W_s h + b_s) + log std, so the mu rows of the
    weight scale by std, the mu biases become std * b_mu + mean, the log-sigma biases gain log std.
    ``weight`` [..., 2K, d], ``bias`` [..., 2K] (zeros if the head had none), ``mean``/``std`` [K].
    """
    row_scale = torch.stack([std, torch.ones_like(std)], -1).flatten()  # (std_1, 1, std_2, 1, ...)
    row_shift = torch.stack([mean, std.log()], -1).flatten()  # (mean_1, log std_1, ...)
    return weight * row_scale[:, None], bias * row_scale + row_shift


# ----------------------------------------------------------------------------------------------
# Modules


def init_linear_(layer: nn.Linear, generator: torch.Generator | None) -> nn.Linear:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn from ``generator``."""
    bound = 1.0 / math.sqrt(layer.in_features)
    with torch.no_grad():
        layer.weight.uniform_(-bound, bound, generator=generator)
        if layer.bias is not None:
            layer.bias.uniform_(-bound, bound, generator=generator)
    return layer


class ValueEnsemble(nn.Module):
    """M value heads in one batched weight [M, 2K, d] (M = 1 is a single head): h -> [M, B, 2K]."""

    def __init__(self, d: int, k: int, members: int = 1, bias: bool = False,
                 generators: list[torch.Generator] | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(members, 2 * k, d))
        self.bias = nn.Parameter(torch.zeros(members, 2 * k)) if bias else None
        for m, g in enumerate(generators or [None] * members):  # member m: its own seed (docs/method.md 4)
            layer = init_linear_(nn.Linear(d, 2 * k, bias=bias), g)
            with torch.no_grad():
                self.weight[m] = layer.weight
                if bias:
                    self.bias[m] = layer.bias

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """h [B, d] (shared by all members) or [M, B, d] (one minibatch per member) -> [M, B, 2K]."""
        # W h^T rather than h W^T: same numbers, but autograd's weight gradient is then a fat
        # [2K, B] x [B, d] product instead of a skinny one, ~3x faster on CPU at d = 4096.
        out = torch.matmul(self.weight, h.transpose(-1, -2)).transpose(-1, -2)  # shared h broadcasts
        return out if self.bias is None else out + self.bias[:, None, :]


def mlp(d: int, hidden: int, k: int, n_hidden: int, act: type[nn.Module]) -> nn.Sequential:
    """Linear(d,h) -> act -> (Linear(h,h) -> act) * (n_hidden - 1) -> Linear(h,k)."""
    layers: list[nn.Module] = []
    for i in range(n_hidden):
        layers += [nn.Linear(d if i == 0 else hidden, hidden), act()]
    return nn.Sequential(*layers, nn.Linear(hidden, k))


class URMGate(nn.Module):
    """The published URM gate: Linear(d,h) -> SELU -> Linear(h,h) -> SELU -> Linear(h,K), unnormalised.

    Its layers are ``fc`` (tensors ``weights.fc.{0,2,4}.*``, the published checkpoint's names, which
    SGLang's ``LlamaForSequenceClassificationWithNormal_Weights`` loads); a state dict saved before they
    were (``weights.{0,2,4}.*``) loads too. ``gate[i]`` is ``gate.fc[i]``.
    """

    def __init__(self, d: int, k: int, hidden: int | None = None):
        super().__init__()
        self.fc = mlp(d, hidden or d, k, 2, nn.SELU)
        self._register_load_state_dict_pre_hook(rename_unnested_gate)

    def __getitem__(self, i: int) -> nn.Module:
        return self.fc[i]

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc(h)


def rename_unnested_gate(state_dict, prefix, *args) -> None:
    """``weights.0.weight`` (the gate's names before ``fc``) -> ``weights.fc.0.weight``, in place."""
    for key in [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".")[0].isdigit()]:
        state_dict[prefix + "fc." + key[len(prefix):]] = state_dict.pop(key)


def urm_gate(d: int, k: int, hidden: int | None = None) -> URMGate:
    """The published URM gate (``URMGate``)."""
    return URMGate(d, k, hidden)


class SoftmaxGate(nn.Module):
    """ArmoRM-style gate: ReLU MLP, softmax(x / T) over the ATTRIBUTE axis, times a learned scale.

    The softmax runs over dim -1 (attributes), never over chosen/rejected (ArmoRM's trainer bug,
    docs/method.md 3), so each row's weights sum to ``scale``.
    """

    def __init__(self, d: int, k: int, hidden: int | None = None, temperature: float | None = None):
        super().__init__()
        self.layers = mlp(d, hidden or SOFTMAX_GATE_HIDDEN, k, SOFTMAX_GATE_LAYERS, nn.ReLU)
        self.scale = nn.Parameter(torch.ones(1))
        self.temperature = SOFTMAX_GATE_TEMPERATURE if temperature is None else float(temperature)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.layers(h) / self.temperature, dim=-1) * self.scale


class RidgePosterior(nn.Module):
    """The closed-form posterior of one label group's ridge fit (docs/method.md 10): h [B, d] -> the epistemic variance
    of each of its attributes' means [B, K_g],
        s_k^2 [ c(h)^2 / cᵀc + sum_j (v_jᵀz)^2 / (lam_j + alpha_k) + |z - V Vᵀz|^2 / alpha_k ],  z = h - c(h) g,
    c(h) = u.h (``direction``; 1 for a head with a bias). Every term is a sum of squares (no difference of large
    numbers). The last, the part of h outside the span of the training rows, is a residual only when the basis is
    narrower than h (``ridge.posterior_factor`` completes it to d directions at 1 / alpha where that is cheaper), so
    inference is one [B, d] x [d, r] product, and one [B, r] x [r, d] more for the residual.
    Frozen parameters (``requires_grad`` False: nothing trains them; parameters, not buffers, so that transformers
    keeps them in float32 under a bf16 load, 4.57 as 5.x); ``attributes`` are the group's value-head attributes."""

    def __init__(self, d: int, rank: int, attributes: list[int], direction: bool = True):
        super().__init__()
        self.attributes = list(attributes)
        k = len(self.attributes)

        def frozen(*shape):
            return nn.Parameter(torch.zeros(*shape), requires_grad=False)

        self.basis = frozen(d, rank)  # V: eigenvectors of the centred rows' Gram (completed where cheaper)
        self.shrink = frozen(k, rank)  # 1 / (lam_j + alpha_k)
        self.outside = frozen(k)  # 1 / alpha_k
        self.noise = frozen(k)  # s_k^2: the fit's residual variance (leave-one-out MSE)
        self.center = frozen(d)  # g: Z = X - c gᵀ
        self.direction = frozen(d) if direction else None  # u: c(h) = u.h
        self.column = frozen(1)  # 1 / cᵀc

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h.to(self.basis.dtype)
        c = h @ self.direction if self.direction is not None else h.new_ones(h.shape[0])
        z = h - c[:, None] * self.center[None, :]
        p = z @ self.basis  # [B, r]
        var = c.square()[:, None] * self.column + p.square() @ self.shrink.T
        if self.basis.shape[1] < self.basis.shape[0]:
            var = var + (z - p @ self.basis.T).square().sum(-1, keepdim=True) * self.outside[None, :]
        return self.noise[None, :] * var


def epistemic_variance(heads: nn.Module, h: torch.Tensor) -> torch.Tensor | None:
    """Each attribute's epistemic variance [B, K] from the heads' ridge posterior (None without one)."""
    groups = getattr(heads, "posterior", None)
    if groups is None:
        return None
    var = h.new_zeros(h.shape[0], heads.score.out_features // 2)
    for group in groups:
        var[:, group.attributes] = group(h).to(var.dtype)
    return var


# ----------------------------------------------------------------------------------------------
# The heads: built onto a module, then the score math on them


def build_heads(module: nn.Module, d: int, k: int, members: int = 1, bias: bool = False, gate: str | None = None,
                gate_hidden: int | None = None, temperature: float | None = None,
                posterior: list[dict] | None = None) -> dict:
    """Give ``module`` the heads, under the export's tensor names; returns the resolved architecture
    (these keyword arguments with the gate's actual hidden width and temperature). ``posterior``: one
    {"attributes": [k, ...], "rank": r, "direction": bool} per label group of a closed-form value head
    (``RidgePosterior``), or None (no epistemic_std)."""
    if gate not in (None, *GATES):
        raise ValueError(f"unknown gate {gate!r}: use one of {GATES}")
    module.score = nn.Linear(d, 2 * k, bias=bias)
    module.ensemble = ValueEnsemble(d, k, members, bias) if members > 1 else None
    module.weights = urm_gate(d, k, gate_hidden) if gate == "urm" else None
    module.softmax_gate = SoftmaxGate(d, k, gate_hidden, temperature) if gate == "softmax" else None
    module.posterior = nn.ModuleList(
        [RidgePosterior(d, int(g["rank"]), g["attributes"], bool(g["direction"])) for g in posterior]) \
        if posterior else None
    first = module.weights[0] if module.weights is not None else (
        module.softmax_gate.layers[0] if module.softmax_gate is not None else None)
    return {"members": members, "bias": bias, "gate": gate,
            "gate_hidden": first.out_features if first is not None else None,
            "temperature": module.softmax_gate.temperature if module.softmax_gate is not None else None,
            "posterior": [{"attributes": list(map(int, g["attributes"])), "rank": int(g["rank"]),
                           "direction": bool(g["direction"])} for g in posterior] if posterior else None}


def gate_weights(heads: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """w(h) [B, K]: the gate's output, or 1/K each without a gate (stage 1 only)."""
    if heads.weights is not None:
        return heads.weights(h)
    if heads.softmax_gate is not None:
        return heads.softmax_gate(h)
    k = heads.score.out_features // 2
    return h.new_full((h.shape[0], k), 1.0 / k)


def head_outputs(heads: nn.Module, h: torch.Tensor) -> dict[str, torch.Tensor]:
    """h [B, d] -> ``OUTPUTS``: the score, its std, per-attribute means, stds and gate weights, with an
    ensemble each member's score under the same weights and their std (docs/method.md 1, 4), and with a ridge
    posterior the epistemic std of each attribute's mean and of the score under the same weights, the
    attributes taken as independent as for sigma (docs/method.md 10)."""
    h = h.to(heads.score.weight.dtype)
    mu, log_sigma = split_mean_logstd(heads.score(h))
    sigma = log_sigma.exp()
    w = gate_weights(heads, h)
    out = {"score": score(w, mu), "score_std": score_variance(w, sigma).sqrt(),
           "attribute_means": mu, "attribute_stds": sigma, "gating_weights": w}
    if heads.ensemble is not None:
        member_mu, _ = split_mean_logstd(heads.ensemble(h))  # [M, B, K]
        out["ensemble_scores"] = score(w, member_mu).T  # [B, M]
        out["ensemble_std"] = out["ensemble_scores"].std(-1)
    var = epistemic_variance(heads, h)
    if var is not None:
        out["epistemic_std"] = (w.square() * var).sum(-1).sqrt()
        out["attribute_epistemic_stds"] = var.sqrt()
    return out


class Heads(nn.Module):
    """h [B, d] -> ``head_outputs``: score, its std, per-attribute mu/sigma, gate weights, ensemble spread.

    Without a gate (stage 1 only) the weights are equal, w_k = 1/K. With an ensemble (M > 1)
    ``score.weight`` is the member average, so mu is exactly the ensemble-mean mu (the head is
    linear) and sigma the members' geometric mean; ``ensemble_std`` is the std (unbiased, over M)
    of the members' scores under the same weights: the epistemic part (docs/method.md 4). A closed-form
    value head also carries its ridge posterior (``posterior``), which gives ``epistemic_std`` (docs/method.md 10).
    """

    def __init__(self, d: int, k: int, members: int = 1, bias: bool = False, gate: str | None = None,
                 gate_hidden: int | None = None, temperature: float | None = None,
                 posterior: list[dict] | None = None):
        super().__init__()
        self.d, self.k = d, k
        self.architecture = build_heads(self, d, k, members, bias, gate, gate_hidden, temperature, posterior)

    @property
    def members(self) -> int:
        return self.architecture["members"]

    @property
    def gate(self) -> str | None:
        return self.architecture["gate"]

    def gate_weights(self, h: torch.Tensor) -> torch.Tensor:
        return gate_weights(self, h)

    def forward(self, h: torch.Tensor) -> dict[str, torch.Tensor]:
        return head_outputs(self, h)
