"""The model card (README.md) of an export: attributes, data and metrics from heads.json, usage, uncertainty."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.model import PUBLISHED_ARCHITECTURE, HeadsMeta, StageRecord

# The example of the peers' model cards (ArmoRM, URM): answer 2 is the right one. `make demo` scores it too.
SIGMOID_PROMPT = "What is the range of the numeric output of a sigmoid node in a neural network?"
SIGMOID_ANSWERS = ("The output of a sigmoid node is bounded between -1 and 1.",
                   "The output of a sigmoid node is bounded between 0 and 1.")


def sigmoid_example() -> list[list[dict]]:
    """The two conversations of the sigmoid example (answer 1, answer 2) as message lists."""
    return [[{"role": "user", "content": SIGMOID_PROMPT}, {"role": "assistant", "content": a}] for a in SIGMOID_ANSWERS]


USAGE = '''```python
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_name = "{name}"
model = AutoModelForSequenceClassification.from_pretrained(model_name, device_map='auto', trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(model_name, trust_remote_code=True)
prompt = "{prompt}"
response1 = "{answer1}"
response2 = "{answer2}"
resp1 = [{{"role": "user", "content": prompt}}, {{"role": "assistant", "content": response1}}]
resp2 = [{{"role": "user", "content": prompt}}, {{"role": "assistant", "content": response2}}]
resp1 = tokenizer.apply_chat_template(resp1, tokenize=False)
resp2 = tokenizer.apply_chat_template(resp2, tokenize=False)
resp1 = tokenizer(resp1, return_tensors="pt").to(model.device)
resp2 = tokenizer(resp2, return_tensors="pt").to(model.device)
with torch.no_grad():
    out1 = model(resp1['input_ids'], attention_mask=resp1['attention_mask'])
    out2 = model(resp2['input_ids'], attention_mask=resp2['attention_mask'])
score1, score2 = out1.logits[0][0].item(), out2.logits[0][0].item()
print(score1, score2)
print(out1.score_std[0].item(), out1.attribute_means[0].tolist(), out1.attribute_stds[0].tolist())
print(model.p_chosen(out2, out1))  # P(response 2 better): under Bradley-Terry and under the Gaussians
```'''


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def attribute_table(meta: HeadsMeta) -> str:
    """One row per attribute: stage-1 validation metrics and the gate's mean weight."""
    names = meta.attributes
    per = meta.value_head.val.get("per_attribute") or {}
    gate = meta.gating.val if meta.gating else {}
    w_mean, w_std = gate.get("weights_mean") or {}, gate.get("weights_std") or {}
    rows = ["| k | attribute | val MSE | val Pearson r | val NLL | mean sigma | 50% / 90% coverage | gate weight (mean +- std across prompts) |",
            "|---|---|---|---|---|---|---|---|"]
    for k, name in enumerate(names):
        m = per.get(name, {})
        weight = f"{_fmt(w_mean.get(name))} +- {_fmt(w_std.get(name))}" if name in w_mean else "1/K (no gate)"
        rows.append(f"| {k} | {name} | {_fmt(m.get('mse'))} | {_fmt(m.get('pearson'))} | {_fmt(m.get('nll'))} | "
                    f"{_fmt(m.get('mean_sigma'))} | {_fmt(m.get('coverage50'))} / {_fmt(m.get('coverage90'))} | {weight} |")
    return "\n".join(rows)


def stage_section(title: str, stage: StageRecord | None, keys: tuple[str, ...]) -> str:
    """A stage's cache identity, config and final validation metrics."""
    if stage is None:
        return f"### {title}\n\nNot trained.\n"
    cache, val = stage.cache, stage.val
    lines = [f"### {title}", "",
             f"- cache: `{cache.path}` (fingerprint `{cache.fingerprint}`), backbone "
             f"`{cache.backbone}` at `{cache.backbone_revision}`, chat template hash "
             f"`{cache.chat_template_hash}`",
             f"- config: `{json.dumps({k: v for k, v in stage.config.items() if k not in ('device',)})}`",
             f"- epochs run: {stage.epochs_run}, best epoch: {stage.best_epoch}",
             "- validation: " + ", ".join(f"{k} {_fmt(val.get(k))}" for k in keys if k in val)]
    if "equal_weights" in val:
        eq = val["equal_weights"]
        lines.append(f"- equal weights (w_k = 1/K) on the same pairs: accuracy {_fmt(eq.get('accuracy'))}, "
                     f"BT loss {_fmt(eq.get('bt_loss'))}")
    chance = val.get("chance") or {}
    if chance and not chance.get("better_than_chance"):
        lines.append(f"- **not shown better than chance**: {chance.get('wins')} of {chance.get('untied')} untied "
                     f"{chance.get('where', 'validation')} pairs right, one-sided sign test against 1/2 p = "
                     f"{_fmt(chance.get('p_value'))}")
    return "\n".join(lines) + "\n"


def uncertainty_note(meta: HeadsMeta) -> str:
    """How the stated uncertainty was obtained, and what it measured on held-out data."""
    loss, sigma, pairs = meta.value_head.config.get("loss"), meta.sigma_calibration, meta.pair_calibration
    note = ["Each attribute k has a Gaussian N(mu_k, sigma_k^2) (`attribute_means`, `attribute_stds`). With the "
            "attributes treated as independent, the score s = sum_k w_k mu_k has variance "
            "Var s = sum_k w_k^2 sigma_k^2 (`score_std` = its square root). For two responses A and B: "
            "P(A > B) = sigmoid((s_A - s_B) / T_bt) under Bradley-Terry, and Phi((s_A - s_B) / (T_gauss "
            "sqrt(Var_A + Var_B))) under the Gaussians (`model.p_chosen(out_a, out_b)`; `urm score` on pairs "
            "writes both)."]
    if sigma is not None and sigma.method == "calibrated" and loss == "ridge":
        b, a = sigma.before, sigma.after
        note.append("**How sigma was obtained.** The means were solved in closed form (ridge, the penalty per attribute "
                    "by exact leave-one-out); log sigma was fitted by ridge to the log squared leave-one-out residuals "
                    "(sigma is large where the errors are), then refit by Gaussian NLL on the leave-one-out residuals "
                    f"of {sigma.calibration_rows} held-out calibration rows (log sigma <- a log sigma + b, per "
                    f"attribute). There, the central 90% interval covered {_fmt(b.get('coverage90'))} of the labels "
                    f"before and {_fmt(a.get('coverage90'))} after (50%: {_fmt(b.get('coverage50'))} -> "
                    f"{_fmt(a.get('coverage50'))}; nominal 0.9 and 0.5).")
    elif sigma is not None and sigma.method == "calibrated":
        b, a = sigma.before, sigma.after
        note.append(f"**How sigma was obtained.** The means were trained with the `{loss}` loss; then, with the "
                    f"means frozen, each log-sigma row was refit by Gaussian NLL on {sigma.calibration_rows} held-out "
                    "calibration rows the means never saw (log sigma <- a log sigma + b, per attribute). On the "
                    f"validation split, the central 90% interval covered {_fmt(b.get('coverage90'))} of the labels "
                    f"before and {_fmt(a.get('coverage90'))} after (50%: {_fmt(b.get('coverage50'))} -> "
                    f"{_fmt(a.get('coverage50'))}; nominal 0.9 and 0.5).")
    elif loss == "reparam":
        note.append("**This value head was trained with the `reparam` loss and not calibrated**: its expected "
                    "value is (mu - y)^2 + sigma^2, which pushes sigma towards 0, so the stds are far too small "
                    "(see the coverage columns above). Train with calibration (the default) or `--loss nll`.")
    else:
        note.append(f"**How sigma was obtained.** Trained with the `{loss}` loss on the training rows, not "
                    "recalibrated on held-out data (see the coverage columns above).")
    members, posterior = meta.architecture.get("members", 1) > 1, bool(meta.architecture.get("posterior"))
    if members or posterior:
        epistemic = ([("`ensemble_std` is epistemic: how much the ensemble's members disagree about it (with ridge, "
                       "fits on bootstrap resamples of the training rows: it grows where the training data is thin or "
                       "absent)")] if members else []) + \
            ([("`epistemic_std` is epistemic too, in closed form: the ridge posterior's std of the score, "
               "s_k^2 h^T (Z^T Z + alpha_k I)^-1 h per attribute (s_k^2 the fit's leave-one-out MSE), which grows "
               "with the distance of h from the span of the training rows")] if posterior else [])
        note.append("**Aleatoric and epistemic.** `score_std` and `attribute_stds` are aleatoric: the noise a rating "
                    "of the response carries. " + ". ".join(epistemic) + ".")
    if pairs is not None:
        note.append(f"**Pair probabilities.** T_bt = {_fmt(pairs.temperature_bt)} and T_gauss = "
                    f"{_fmt(pairs.temperature_gaussian)}, fitted by NLL on {pairs.validation_pairs} held-out pairs; "
                    f"ECE there {_fmt(pairs.before.get('ece'))} -> {_fmt(pairs.after.get('ece'))} (BT) and "
                    f"{_fmt(pairs.before.get('ece_gaussian'))} -> {_fmt(pairs.after.get('ece_gaussian'))} (Gaussian).")
    return "\n\n".join(note)


def is_hub_id(spec: str) -> bool:
    """"owner/name" on the Hub, not a local path, a file or a synthetic:/package: source."""
    return spec.count("/") == 1 and not spec.startswith(("/", ".", "~")) and ":" not in spec and \
        not spec.endswith((".json", ".jsonl", ".parquet", ".gz")) and not Path(spec).exists()


def front_matter(record: dict, datasets: list[str]) -> str:
    """The card's YAML metadata, written by huggingface_hub's ModelCardData (the Hub's own schema): the
    backbone as ``base_model`` (a Hub id only, not a local path), the Hub datasets the caches were made from."""
    from huggingface_hub import ModelCardData

    spec = record["backbone"]["spec"]
    data = ModelCardData(library_name="transformers", pipeline_tag="text-classification",
                         tags=["reward-model", "uncertainty", "urm"], base_model=spec if is_hub_id(spec) else None,
                         datasets=sorted({d for d in datasets if is_hub_id(d)}) or None)
    return f"---\n{data.to_yaml()}\n---"


def serving_section(urm: dict, architecture: str) -> list[str]:
    """What SGLang, RL frameworks and `urm serve` get from this export."""
    if architecture != PUBLISHED_ARCHITECTURE:
        return [("This export's heads are not the published URM's shape (a URM gate as wide as the backbone, no "
                 "value-head bias, a Llama backbone), so `architectures` names `URMForSequenceClassification`, "
                 "which SGLang does not serve (it refuses to load it): serve it with `urm serve` (`/get_reward`, "
                 "`/score`).")]
    extra = [n for n, on in (("ensemble.weight", urm["members"] > 1), ("posterior.*", bool(urm.get("posterior"))),
                             ("base_score.*", urm["base_score"])) if on]
    skipped = f"; it skips {', '.join(f'`{n}`' for n in extra)} (names it does not have)" if extra else ""
    return [(f"`architectures` is `{PUBLISHED_ARCHITECTURE}`, the published URM's class, which SGLang serves "
             "(start it with `--is-embedding --trust-remote-code`: config.json's `model_type` is `urm`, so "
             "transformers reads it only through this folder's configuration_urm.py). SGLang's `/classify` returns "
             "the score alone (`logits[0][0]` here; its gate runs in float16, ours in float32), not sigma, the gate "
             f"weights or P(better){skipped}. For those, `urm serve` answers `/score` and OpenRLHF's `/get_reward`.")]


def model_card(meta: HeadsMeta, record: dict, urm: dict, architecture: str = PUBLISHED_ARCHITECTURE,
               datasets: list[str] | None = None) -> str:
    """The README.md text of an export (``architecture``: config.json's; ``datasets``: the sources of the
    caches the heads were trained on)."""
    backbone = record["backbone"]
    members = urm["members"]
    outputs = ["- `logits` [B, 1]: the reward s (so `logits[0][0]` is the score of the first row)",
               "- `score_std` [B]: sqrt(sum_k w_k^2 sigma_k^2) (aleatoric)",
               "- `attribute_means`, `attribute_stds` [B, K]: mu_k and sigma_k per attribute, in the order below",
               "- `gating_weights` [B, K]: the gate's w_k(h)"]
    if members > 1:
        outputs.append(f"- `ensemble_scores` [B, {members}], `ensemble_std` [B]: each of the {members} value "
                       "heads' score under the same weights, and their std (epistemic)")
    if urm.get("posterior"):
        outputs.append("- `epistemic_std` [B], `attribute_epistemic_stds` [B, K]: the closed-form ridge posterior's "
                       "std of the score (sqrt(sum_k w_k^2 Var_epi,k)) and of each attribute's mean (epistemic: it grows "
                       "for responses unlike the training rows; tensors `posterior.*`)")
    if urm["base_score"]:
        outputs.append("- `base_score` [B]: the backbone reward model's own score (its `score` head, kept as "
                       "`base_score.weight`)")
    shards = record["shards"]
    linked = [n for n, how in shards.items() if how == "linked"]
    return "\n".join([
        front_matter(record, datasets or []),
        "",
        f"# Uncertainty-aware reward model on `{backbone['spec']}`",
        "",
        f"A frozen backbone (`{backbone['spec']}`, revision `{backbone['revision']}`) with a Gaussian value head "
        f"over {len(urm['attributes'])} attributes and a {urm['gate'] or 'no'} gate on its last-token hidden state, "
        f"exported by urm-pipeline {record['pipeline_version']}. Load it with `trust_remote_code=True` "
        "(the code is modeling_urm.py in this folder; transformers 4.57 or 5.x).",
        "",
        "## Outputs", "",
        *outputs,
        "",
        "`return_dict=False` gives a tuple that starts with the logits. The last token is the last 1 in "
        "`attention_mask` (left or right padding, holes allowed); a doubled leading BOS (from tokenising "
        "already-templated text) is ignored, so the usage below scores the same as `urm score`.",
        "",
        "## Attributes", "",
        attribute_table(meta),
        "",
        "## Training data and metrics", "",
        stage_section("Stage 1: value head (attribute regression)", meta.value_head,
                      ("mse", "pearson", "nll", "mean_sigma", "coverage50", "coverage90")),
        stage_section("Stage 2: gating (Bradley-Terry on preference pairs)", meta.gating,
                      ("accuracy", "bt_loss", "ece", "brier", "ece_gaussian", "brier_gaussian")),
        "## Usage", "",
        USAGE.format(name=record["config"]["out_dir"], prompt=SIGMOID_PROMPT, answer1=SIGMOID_ANSWERS[0],
                     answer2=SIGMOID_ANSWERS[1]),
        "",
        "Or batched, with uncertainty, from the command line: `urm score MODEL_DIR --input conversations.jsonl`.",
        "",
        "## Serving", "",
        *serving_section(urm, architecture),
        "",
        "## Uncertainty", "",
        uncertainty_note(meta),
        "",
        "## Files", "",
        "- `urm-heads.safetensors`: the heads (`score.weight` [2K, d] rows interleaved mu_1, log sigma_1, ...; "
        "`weights.fc.{0,2,4}.*` URM gate, `softmax_gate.*` ArmoRM-style gate, `ensemble.weight` [M, 2K, d]); the other "
        "shards are the backbone's (`model.*`); `model.safetensors.index.json` maps every tensor to its shard.",
        "- `heads.json`: the heads' full training record; `urm_export.json`: this export's config and provenance.",
        ("- " + ", ".join(f"`{n}`" for n in linked) + (" is a hardlink" if len(linked) == 1 else " are hardlinks")
         + " of the backbone's own file (the same bytes on disk): writing into it in place (e.g. `save_pretrained` "
         "of a changed model into this folder) would change the backbone too; save elsewhere."
         if linked else "- The backbone shards are copies (or rewritten with renamed tensors)."),
        "",
    ])
