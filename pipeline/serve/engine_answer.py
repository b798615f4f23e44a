"""The whole answer for one response as one flat vector, for engines that return a vector per input (vLLM's
``/pooling``): its layout, the vector made from the heads' outputs, and a vector read back as `urm score`'s row.

The layout depends on the export (K attributes, M ensemble members, whether the heads carry a ridge posterior,
whether the backbone was a reward model), in this order:

  score, score_std,
  attribute_means.<a> for each attribute a, attribute_stds.<a> ..., gating_weights.<a> ...,
  ensemble_std, ensemble_scores.<m> for m = 0..M-1          (only with an ensemble, M > 1)
  epistemic_std, attribute_epistemic_stds.<a> ...           (only with a ridge posterior)
  base_score                                                (only when the backbone was a reward model)
  reward                                                    (the server's reward transform; always last)

So 3 + 3K numbers without an ensemble (18 for the five HelpSteer2 attributes). The reward is last, where
verl reads an engine's one number (``probs[-1]``, ``embedding[-1]``). Pure functions, torch and the
standard library only (imported by the vLLM model and by clients alike).
"""

from __future__ import annotations

PER_ATTRIBUTE = ("attribute_means", "attribute_stds", "gating_weights")
EPISTEMIC = "attribute_epistemic_stds"  # per attribute too, after epistemic_std


def answer_layout(attributes, members: int = 1, base_score: bool = False, epistemic: bool = False) -> list[str]:
    """The name of each position of the answer vector.

    >>> answer_layout(["a", "b"])
    ['score', 'score_std', 'attribute_means.a', 'attribute_means.b', 'attribute_stds.a', 'attribute_stds.b', \
'gating_weights.a', 'gating_weights.b', 'reward']
    >>> answer_layout(["a"], members=2, base_score=True)[-5:]
    ['ensemble_std', 'ensemble_scores.0', 'ensemble_scores.1', 'base_score', 'reward']
    >>> answer_layout(["a"], epistemic=True)[-3:]
    ['epistemic_std', 'attribute_epistemic_stds.a', 'reward']
    """
    names = ["score", "score_std"] + [f"{field}.{a}" for field in PER_ATTRIBUTE for a in attributes]
    if members > 1:
        names += ["ensemble_std"] + [f"ensemble_scores.{m}" for m in range(members)]
    if epistemic:
        names += ["epistemic_std"] + [f"{EPISTEMIC}.{a}" for a in attributes]
    if base_score:
        names.append("base_score")
    return names + ["reward"]


def answer_vectors(outputs: dict, reward):
    """The heads' outputs (``pipeline.model.heads.OUTPUTS`` names, ``base_score`` where there is one) and the
    reward [B] -> the answer vectors [B, N] in ``answer_layout``'s order (a torch tensor, outputs' dtype)."""
    import torch

    score = outputs["score"]
    parts = [score[:, None], outputs["score_std"][:, None]] + [outputs[field] for field in PER_ATTRIBUTE]
    if outputs.get("ensemble_scores") is not None:
        parts += [outputs["ensemble_std"][:, None], outputs["ensemble_scores"]]
    if outputs.get("epistemic_std") is not None:
        parts += [outputs["epistemic_std"][:, None], outputs[EPISTEMIC]]
    if outputs.get("base_score") is not None:
        parts.append(outputs["base_score"][:, None])
    parts.append(torch.as_tensor(reward, dtype=score.dtype, device=score.device).reshape(-1, 1))
    return torch.cat(parts, dim=1)


def read_answer(vector, attributes, members: int = 1, base_score: bool = False, epistemic: bool = False) -> dict:
    """One answer vector -> the fields of `urm score`'s row for it (per-attribute values keyed by attribute
    name, ``ensemble_scores`` a list). ValueError when its length is not the layout's.

    >>> read_answer([1.0, 0.5, 2, 3, 0.1, 0.2, 0.4, 0.6, 0.7], ["a", "b"])["attribute_stds"]
    {'a': 0.1, 'b': 0.2}
    """
    names = answer_layout(attributes, members, base_score, epistemic)
    values = [float(v) for v in vector]
    if len(values) != len(names):
        raise ValueError(f"an answer of {len(values)} numbers, but this export's layout has {len(names)} "
                         f"({len(attributes)} attributes, {members} value head(s)"
                         f"{', base score' if base_score else ''}{', epistemic std' if epistemic else ''}): is it the "
                         "vector of another model?")
    row: dict = {}
    for name, value in zip(names, values):
        field, _, key = name.partition(".")
        if field in PER_ATTRIBUTE or field == EPISTEMIC:
            row.setdefault(field, {})[key] = value
        elif field == "ensemble_scores":
            row.setdefault(field, []).append(value)
        else:
            row[field] = value
    return row
