"""Extraction on the real offline backbone (SmolLM2-135M-Instruct) over 200 real pairs: batched
features equal one-at-a-time features. Slow (~3 min on 2 cores); needs ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.shared_data]


@pytest.fixture(scope="module")
def smollm2():
    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.features import load_backbone

    return load_backbone(SMOLLM2_GGUF, dtype="float32", device="cpu")


def test_batched_equals_one_at_a_time_on_200_real_pairs(smollm2, shared_data):
    from pipeline.data.testing import shortest_real_pairs
    from pipeline.features import embed_all, render_ids

    pairs = shortest_real_pairs(200, shared_data / "hh-rlhf-harmless-base-test.jsonl.gz")
    ids = render_ids(smollm2.tokenizer, [c for p in pairs for c in (p.chosen, p.rejected)])
    assert len(ids) == 400 and len({len(x) for x in ids}) > 20
    # SmolLM2's EOS is its pad token and ends every rendered conversation: the pick must survive it.
    assert all(x[-2] == smollm2.tokenizer.eos_token_id == smollm2.tokenizer.pad_token_id for x in ids)
    batched, _ = embed_all(smollm2, ids, max_tokens=4096)
    single = np.stack([embed_all(smollm2, [x], max_tokens=4096)[0][0] for x in ids])
    diff = np.abs(batched - single).max()
    assert diff <= 1e-4, f"max abs diff {diff}"
