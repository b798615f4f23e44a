"""Every list of allowed values lives with its stage, the configs check against it there, and each option's
``--help`` names every choice: a choice added to a stage and not to the help (or the other way) fails here."""

from __future__ import annotations

import pytest

from pipeline import configs as C
from pipeline.configs.options import ConfigError, options


def choice_lists():
    """(config, option, the stage's list of allowed values) for every option with a fixed set of values."""
    from pipeline.cache import KINDS, STORAGE_DTYPES
    from pipeline.data import PAIR_FORMATS, RATING_FORMATS
    from pipeline.device import AUTO_DTYPES, COMPUTE_DTYPES
    from pipeline.eval import SIGNALS
    from pipeline.features import ATTENTION, ENGINES
    from pipeline.model import TRANSFORMS
    from pipeline.train import GATE_KINDS, STAGE1_LOSSES

    dtypes = (*AUTO_DTYPES, *COMPUTE_DTYPES)
    return [(C.ExtractConfig, "kind", KINDS), (C.ExtractConfig, "storage_dtype", STORAGE_DTYPES),
            (C.ExtractConfig, "attn_implementation", ATTENTION), (C.ExtractConfig, "engine", ENGINES),
            (C.ExtractConfig, "format", RATING_FORMATS + PAIR_FORMATS), (C.ExtractConfig, "dtype", dtypes),
            (C.ValueHeadConfig, "loss", STAGE1_LOSSES), (C.GatingConfig, "gate", GATE_KINDS),
            (C.CurateConfig, "signal", SIGNALS), (C.CurateConfig, "dtype", dtypes), (C.CurateConfig, "format", PAIR_FORMATS),
            (C.ScoreConfig, "reward", TRANSFORMS), (C.ScoreConfig, "dtype", dtypes), (C.ScoreConfig, "format", PAIR_FORMATS),
            (C.ServeConfig, "reward", TRANSFORMS), (C.ServeConfig, "dtype", dtypes)]


@pytest.mark.parametrize("config, name, choices", choice_lists(), ids=lambda v: getattr(v, "__name__", str(v)))
def test_every_choice_is_in_its_options_help_and_accepted(config, name, choices):
    option = next(o for o in options(config) if o.name == name)
    missing = [c for c in choices if c not in option.help]
    assert not missing, f"--{name.replace('_', '-')}'s help does not name {missing}"
    base = {"source": "x.jsonl", "kind": "ratings"} if config is C.ExtractConfig else {}
    for choice in choices:  # the config checks against the stage's own list: each value is taken
        C.build(config, {**base, name: choice})
    with pytest.raises(ConfigError, match=f"--{name.replace('_', '-')} must be one of"):
        C.build(config, {**base, name: "no-such-choice"})


def test_a_choice_missing_from_the_help_is_caught(monkeypatch):
    import pipeline.features as F

    monkeypatch.setattr(F, "ATTENTION", (*F.ATTENTION, "paged_attention"))
    config, name, choices = next(c for c in choice_lists() if c[1] == "attn_implementation")
    option = next(o for o in options(config) if o.name == name)
    assert [c for c in choices if c not in option.help] == ["paged_attention"]


def test_options_the_scoring_commands_share_are_declared_once():
    """--device, --dtype, --verify, --max-tokens-per-batch (the runtime group) and the reading options have one
    declaration and one help text in score, curate and serve."""
    shared = {}
    for config in (C.ScoreConfig, C.CurateConfig, C.ServeConfig):
        for o in options(config):
            if o.path[0] in ("runtime", "reading"):
                shared.setdefault(o.name, set()).add(o.help)
    assert {"device", "dtype", "verify", "max_tokens_per_batch", "format", "skip_invalid", "limit"} <= set(shared)
    assert all(len(helps) == 1 for helps in shared.values()), shared
