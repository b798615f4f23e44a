"""Which stage-1 recipe learns the noise? Value heads on features with a known noise std per attribute.

Features h (d = 32, h[0] = 1) and labels y = h A + 2 + noise with std NOISE_k per attribute, so the
best value head has sigma_k = NOISE_k exactly (pipeline.data.testing.linear_ratings). Each loss (ridge,
the closed-form default; nll, beta-nll, reparam by AdamW) trains through the public entry point (`train_value_head`) on a cache written
by the real writer, once with sigma as the loss left it and once calibrated on the held-out
calibration split (the default); reported: the validation mean sigma per attribute beside the
true std, MSE, and 50% / 90% interval coverage. `tests/test_train.py` asserts the same experiment
(nll within 10%, reparam shrinking sigma, reparam + calibration within 15% and 85-95% coverage).
Writes bench/results/sigma_recovery.json.
"""

from __future__ import annotations

import tempfile

import torch

from bench import machine_info, write_result
from pipeline.data.testing import LINEAR_RATINGS_TRAINING, NOISE, linear_ratings


def main(argv: list[str] | None = None) -> dict:
    from pipeline import ATTRIBUTES
    from pipeline.cache import CacheSpec, open_writer
    from pipeline.configs import ValueHeadConfig, build
    from pipeline.recipes.train import train_value_head

    h, y = linear_ratings()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = CacheSpec(backbone="synthetic/linear", backbone_revision="0", hidden_size=h.shape[1],
                         storage_dtype="float16", max_length=1, chat_template_hash="-",
                         dataset="linear_ratings", dataset_fingerprint="0", kind="ratings")
        writer = open_writer(f"{tmp}/ratings", spec)
        writer.write_part(0, dict(id=[str(i) for i in range(len(h))], source="synthetic",
                                  n_tokens=torch.ones(len(h), dtype=torch.int32).numpy(),
                                  embedding=h, labels=y.numpy()))
        writer.finish(1)
        for loss in ("ridge", "nll", "beta-nll", "reparam"):
            for calibrate in (False, True):
                name = loss + (" + calibration" if calibrate else "")
                cfg = build(ValueHeadConfig, dict(ratings_cache=f"{tmp}/ratings", heads_dir=f"{tmp}/{name}", loss=loss,
                                                  calibrate=calibrate, **LINEAR_RATINGS_TRAINING))
                val = train_value_head(cfg)["val"]
                per = val["per_attribute"]
                out[name] = {"mean_sigma": {a: per[a]["mean_sigma"] for a in ATTRIBUTES}, "mse": val["mse"],
                             "coverage50": val["coverage50"], "coverage90": val["coverage90"],
                             "coverage90_per_attribute": {a: per[a]["coverage90"] for a in ATTRIBUTES}}
    result = {"what": __doc__.split("\n")[0], "true_noise_std": dict(zip(ATTRIBUTES, NOISE.tolist())),
              "losses": out, "machine": machine_info()}
    path = write_result("sigma_recovery", result)
    for name, r in out.items():
        sig = " / ".join(f"{v:.3f}" for v in r["mean_sigma"].values())
        print(f"{name:22s} sigma {sig}  (true {' / '.join(f'{v:.1f}' for v in NOISE.tolist())})  "
              f"mse {r['mse']:.3f}  coverage50 {r['coverage50']:.3f}  coverage90 {r['coverage90']:.3f}")
    print(f"-> {path}")
    return result


if __name__ == "__main__":
    main()
