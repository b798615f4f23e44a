"""An export loaded once for `urm serve`: the ``Service`` the app runs, tokenising and scoring with `urm score`'s
own functions (``pipeline.features.render``, ``pipeline.serve.scoring``), and what /health says about it.
"""

from __future__ import annotations


from pipeline.serve.app import Service
from pipeline.serve.scoring import length_limit, load_scorer, score_ids



def load_service(model_dir: str, cfg):
    """The export loaded once, and how the server tokenises and scores for it (`urm score`'s functions)."""
    from pipeline.features import encode_texts, pad_id_of, render_ids
    from pipeline.model import EXPORT_TENSORS, read_meta

    model, tokenizer = load_scorer(model_dir, cfg.runtime.dtype, cfg.runtime.device, cfg.runtime.verify)
    pad_id = pad_id_of(tokenizer)
    urm = model.config.urm
    published = urm.get("layout") == "published"  # a published-layout checkpoint: no heads.json
    backbone = str(model_dir) if published else read_meta(model_dir, tensors=EXPORT_TENSORS).value_head.cache.backbone
    limit = length_limit(model.config, cfg.max_length)
    info = {"model_dir": str(model_dir), "backbone": backbone, "layout": "published" if published else "export",
            "sigma_calibrated": urm.get("sigma_calibrated"),
            "model_type": model.config.model_type, "hidden_size": model.config.hidden_size,
            "attributes": list(urm["attributes"]), "members": urm["members"], "gate": urm["gate"],
            "base_score": bool(urm.get("base_score")), "epistemic_std": bool(urm.get("posterior")),
            "max_length": limit,
            "trained_max_length": urm.get("max_length"), "pair_temperature": urm.get("pair_temperature"),
            "device": str(model.device), "dtype": str(model.dtype).removeprefix("torch.")}
    return Service(encode_conversations=lambda convs: render_ids(tokenizer, convs),
                   encode_texts=lambda texts: encode_texts(tokenizer, texts),
                   score_fn=lambda ids: score_ids(model, ids, cfg.runtime.max_tokens_per_batch, pad_id),
                   names=list(urm["attributes"]), max_length=limit, max_tokens=cfg.runtime.max_tokens_per_batch,
                   info=info,
                   members=int(urm["members"]), posterior=bool(urm.get("posterior")))
