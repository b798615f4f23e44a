"""`make bench-gpu` (bench/gpu.py): refuses to run without a GPU, and every code path runs on a tiny CPU dry run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import gpu

ROOT = Path(__file__).resolve().parents[1]


def test_card_peaks_come_from_the_spec_table():
    assert gpu.card_peak("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert gpu.card_peak("NVIDIA H100 PCIe") == pytest.approx(756e12)
    assert gpu.card_peak("NVIDIA H200") == pytest.approx(989.4e12)
    assert gpu.card_peak("NVIDIA A100-SXM4-80GB") == pytest.approx(312e12)
    assert gpu.card_peak("Tesla T4") is None


def test_attention_flops_count_the_causal_half_of_qk_and_av():
    layers, d = 2, 8
    # one layer, one conversation of L tokens: QK^T and AV each L x L x d multiply-adds, half of them causal
    for L in (1, 5, 64):
        per_layer = 2 * (2 * L * L * d) / 2
        assert gpu.attention_flops([L], layers, d) == layers * per_layer
    assert gpu.attention_flops([3, 4], layers, d) == gpu.attention_flops([3], layers, d) + gpu.attention_flops([4], layers, d)


def test_lengths_are_the_real_distribution_capped():
    lengths = gpu.sample_lengths(5000, seed=0)
    assert lengths.max() <= gpu.MAX_LENGTH and lengths.min() >= 1
    assert np.array_equal(lengths, gpu.sample_lengths(5000, seed=0))
    assert 50 < np.median(lengths) < 2000  # conversations, not a constant


def test_pack_batches_cover_every_row_once_within_the_budget():
    lengths = np.array([5, 40, 7, 33, 12, 100, 1])
    batches = gpu.pack_batches(lengths, 50)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert all(lengths[b].sum() <= 50 or len(b) == 1 for b in batches)


def test_tiny_dry_run_runs_every_way_and_they_agree():
    result = gpu.main(["--device", "cpu", "--tiny", "--conversations", "24", "--one-at-a-time", "6"])
    e = result["extraction"]
    for way in ("one_at_a_time", "batched_sdpa"):
        assert e[way]["tokens_per_s"] > 0 and e[way]["share_of_measured_matmul"] > 0
    assert e["batched_sdpa"]["tokens"] == e["packed"]["tokens"] > e["one_at_a_time"]["tokens"]
    assert e["packed"]["available"], e["packed"]["how"]
    # bf16: the same conversations give the same last-token states whichever way they are batched; packed
    # conversations that attended across their boundaries would be off by far more
    assert e["agreement_batched_vs_one_at_a_time"] < 0.05
    assert e["packed"]["agreement_vs_batched"] < 0.05
    assert result["heads"]["stage1"]["examples_per_s"] > 0 and result["heads"]["stage2"]["pairs_per_s"] > 0
    assert result["versions"]["transformers"] and result["dry_run"]


@torch.inference_mode()
def test_packed_rows_do_not_attend_across_conversations():
    backbone = gpu.RandomLlama(gpu.TINY, "cpu", torch.float32, "sdpa")
    ids = gpu.random_ids([9, 4, 13], gpu.TINY["vocab_size"])
    _, h = gpu.packed(backbone, ids, 1000)  # all three in one row
    alone = torch.stack([backbone.model(input_ids=torch.tensor([x])).last_hidden_state[0, -1] for x in ids])
    assert torch.allclose(torch.from_numpy(h), alone, atol=1e-4)


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the benchmark would run")
def test_bench_gpu_without_a_gpu_exits_non_zero_naming_the_reason():
    run = subprocess.run([sys.executable, "-m", "bench", "gpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and "needs a CUDA GPU" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
