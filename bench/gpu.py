"""Extraction on a GPU at Llama-3.1-8B's shapes: tokens/s and model FLOPs utilisation (MFU), three ways side by side,
and the two head trainers at full scale (`make bench-gpu`, `python -m bench gpu`).

The backbone is a LlamaModel built from Llama-3.1-8B's config with random weights in bf16: the same shapes and
FLOPs as the real backbone, no download. The conversations are token counts drawn (seeded) from the length
distribution of the real pair files in ../shared/data, capped at 4096 tokens (``bench/conversation_lengths.json``,
remade by ``--write-lengths``: every conversation of those files rendered with the SmolLM2 tokenizer's chat
template; Llama 3's tokenizer is not available offline). Token ids are random. Ways, in one run:

  one_at_a_time  the peer's (ArmoRM's) loop: one conversation per forward, batch 1
  batched_sdpa   ours: pipeline.features.embedding.embed_all, length-sorted token-budget batches, right padding, sdpa
  packed         padding-free: the conversations of a batch concatenated into one row, position_ids restarting
                 at 0 for each; with flash_attention_2 (the flash-attn package) transformers runs varlen
                 attention; with sdpa transformers 5.x builds a block-diagonal mask from the position_ids
                 (masking_utils.find_packed_sequence_indices), correct but attending over the whole packed row

FLOPs per conversation of L tokens = 2 x non-embedding parameters x L + attention 4 x layers x d x L^2 / 2
(QK^T and AV, causal half); padding and the masked half are not counted. MFU = model FLOP/s over the card's dense
bf16 peak from its spec sheet (PEAK_BF16_TFLOPS); beside it, the rate of a bf16 8192^3 matmul measured in the same
run. Heads: stage 1 (20k ratings) and stage 2 (80k pairs) at d = 4096 on the GPU, via bench.train_heads.
Without a CUDA device the benchmark exits non-zero saying so; ``--device cpu --tiny`` runs every code path on a
tiny config (a test's dry run; its figures mean nothing). Results: bench/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from bench import SHARED_DATA, machine_info, write_result

LENGTHS = Path(__file__).resolve().parent / "conversation_lengths.json"
MAX_LENGTH = 4096
LLAMA_31_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                   num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                   rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets; matched in order on the device name.
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4),
                    ("A100", 312.0), ("L40S", 362.05), ("A10G", 70.0)]


class NoGPU(SystemExit):
    pass


def card_peak(name: str) -> float | None:
    """The spec-sheet dense bf16 peak (FLOP/s) of a card by its torch device name, None when unknown."""
    return next((tf * 1e12 for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def measured_matmul(device, dtype, n: int, repeats: int = 10) -> float:
    """The best FLOP/s of an n x n x n matmul in ``dtype`` on ``device`` (after a warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Conversation lengths


def write_lengths() -> dict:
    """Every conversation of the real pair files rendered with SmolLM2's chat template: its token count."""
    from pipeline.configs import SMOLLM2_GGUF
    from pipeline.data import load_preferences
    from pipeline.features import load_backbone, render_ids

    tokenizer = load_backbone(SMOLLM2_GGUF, dtype="float32", device="cpu").tokenizer
    files = {}
    for path in sorted(SHARED_DATA.iterdir()):
        try:
            pairs, _ = load_preferences(str(path))
        except Exception:  # a ratings file, or the README
            continue
        ids = render_ids(tokenizer, [c for p in pairs for c in (p.chosen, p.rejected)])
        files[path.name] = [len(x) for x in ids]
    out = {"what": "token counts of every conversation (chosen and rejected) of the pair files in ../shared/data, "
                   "rendered with the SmolLM2-135M-Instruct chat template (python -m bench gpu --write-lengths)",
           "files": files}
    LENGTHS.write_text(json.dumps(out) + "\n")
    return out


def sample_lengths(n: int, seed: int = 0, cap: int = MAX_LENGTH) -> np.ndarray:
    """n seeded draws from the real conversations' lengths (every file's conversations pooled), capped at ``cap``."""
    pool = np.concatenate([np.asarray(v) for v in json.loads(LENGTHS.read_text())["files"].values()])
    return np.minimum(np.random.default_rng(seed).choice(pool, n), cap)


def attention_flops(lengths, layers: int, d: int) -> float:
    """QK^T and AV over the causal half: 2 matmuls x 2 FLOPs x L^2 d / 2, per layer."""
    return float(sum(2 * layers * d * int(L) ** 2 for L in lengths))


# ----------------------------------------------------------------------------------------------
# The three ways


class RandomLlama:
    """A Backbone-like holder (model, device, hidden_size, tokenizer pad id, no score head) for embed_all."""

    def __init__(self, config: dict, device, dtype, attention: str):
        from transformers import LlamaConfig, LlamaModel

        torch.manual_seed(0)
        cfg = LlamaConfig(**config)
        default = torch.get_default_dtype()
        torch.set_default_dtype(dtype)  # built in bf16 on the device: no fp32 copy of 8B parameters
        try:
            with torch.device(device):
                self.model = LlamaModel._from_config(cfg, attn_implementation=attention).eval()
        finally:
            torch.set_default_dtype(default)
        self.device, self.hidden_size, self.score_head = torch.device(device), cfg.hidden_size, None
        self.tokenizer = type("Tokenizer", (), {"pad_token_id": 0})()
        self.config = cfg

    def params(self) -> int:
        """Non-embedding parameters (the embedding is a lookup, no FLOPs)."""
        return sum(p.numel() for p in self.model.parameters()) - self.model.embed_tokens.weight.numel()


def random_ids(lengths, vocab: int, seed: int = 1) -> list[list[int]]:
    g = np.random.default_rng(seed)
    return [g.integers(1, vocab, int(L)).tolist() for L in lengths]


@torch.inference_mode()
def one_at_a_time(backbone: RandomLlama, ids) -> tuple[float, list]:
    """ArmoRM's loop: model(ids).last_hidden_state[0][-1].cpu(), one conversation per call."""
    out, d = [], backbone.device
    sync(d)
    t = time.perf_counter()
    for x in ids:
        out.append(backbone.model(input_ids=torch.tensor([x], device=d), use_cache=False).last_hidden_state[0, -1].cpu())
    sync(d)
    return time.perf_counter() - t, out


def batched(backbone: RandomLlama, ids, max_tokens: int) -> tuple[float, np.ndarray, int]:
    """Ours (pipeline.features.embedding.embed_all); also the tokens processed including padding."""
    from pipeline.features import embed_all

    processed = [0]
    sync(backbone.device)
    t = time.perf_counter()
    h, _ = embed_all(backbone, ids, max_tokens, lambda n, tokens, padded: processed.__setitem__(0, processed[0] + padded))
    sync(backbone.device)
    return time.perf_counter() - t, h, processed[0]


def pack_batches(lengths, max_tokens: int) -> list[np.ndarray]:
    """Consecutive length-sorted rows whose total stays within ``max_tokens`` (a longer row alone)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    batches, current, total = [], [], 0
    for i in order:
        if current and total + lengths[i] > max_tokens:
            batches.append(np.array(current))
            current, total = [], 0
        current.append(i)
        total += int(lengths[i])
    return batches + ([np.array(current)] if current else [])


@torch.inference_mode()
def packed(backbone: RandomLlama, ids, max_tokens: int) -> tuple[float, np.ndarray]:
    """Padding-free: each batch one row of concatenated conversations, position_ids restarting per conversation,
    no attention mask; h = the hidden state at each conversation's last token."""
    lengths = np.array([len(x) for x in ids])
    h = np.empty((len(ids), backbone.hidden_size), dtype=np.float32)
    d = backbone.device
    sync(d)
    t = time.perf_counter()
    for rows in pack_batches(lengths, max_tokens):
        flat = torch.tensor([tok for i in rows for tok in ids[i]], device=d)[None]
        pos = torch.cat([torch.arange(int(lengths[i]), device=d) for i in rows])[None]
        hidden = backbone.model(input_ids=flat, position_ids=pos, use_cache=False).last_hidden_state[0]
        last = torch.from_numpy(np.cumsum(lengths[rows]) - 1).to(d)
        h[rows] = hidden[last].float().cpu().numpy()
    sync(d)
    return time.perf_counter() - t, h


def packed_support(attention: str) -> tuple[bool, str]:
    """Whether transformers separates packed conversations for this attention kernel, and how."""
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False, "this transformers has no packed-sequence detection (masking_utils.find_packed_sequence_indices)"
    if attention == "flash_attention_2":
        return True, "flash_attention_2 varlen kernel from position_ids (padding-free)"
    return True, (f"{attention}: block-diagonal causal mask built from position_ids (masking_utils); correct, but "
                  "the kernel attends over the whole packed row with an explicit mask (no flash kernel)")


def flash_attention_2() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None


def way_result(seconds: float, lengths, flops: float, peak: float | None, matmul: float, processed=None) -> dict:
    tokens = int(np.sum(lengths))
    out = {"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds,
           "model_tflops_per_s": flops / seconds / 1e12,
           "mfu_of_spec_peak": None if peak is None else flops / seconds / peak,
           "share_of_measured_matmul": flops / seconds / matmul}
    if processed is not None:
        out["processed_tokens"], out["padding_share"] = processed, 1 - tokens / processed
    return out


def extraction(args, device) -> dict:
    config = TINY if args.tiny else LLAMA_31_8B
    dtype = torch.bfloat16
    lengths = sample_lengths(args.conversations, cap=min(MAX_LENGTH, config["max_position_embeddings"]))
    if args.tiny:
        lengths = np.minimum(lengths, 64)
    ids = random_ids(lengths, config["vocab_size"])
    backbone = RandomLlama(config, device, dtype, "sdpa")
    layers, d = config["num_hidden_layers"], config["hidden_size"]
    flops = 2 * backbone.params() * float(np.sum(lengths)) + attention_flops(lengths, layers, d)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = card_peak(name)
    matmul = measured_matmul(device, dtype, 256 if args.tiny else 8192)
    warm = ids[: max(2, len(ids) // 20)]
    one_at_a_time(backbone, warm[:2]), batched(backbone, warm, args.max_tokens_per_batch)  # warm-up
    single_n = min(len(ids), args.one_at_a_time)  # the loop is slow: timed on the first rows only
    s_single, h_single = one_at_a_time(backbone, ids[:single_n])
    single_flops = 2 * backbone.params() * float(np.sum(lengths[:single_n])) + attention_flops(lengths[:single_n],
                                                                                               layers, d)
    s_batched, h_batched, processed = batched(backbone, ids, args.max_tokens_per_batch)
    result = {
        "model": "LlamaModel, Llama-3.1-8B config, random weights" if not args.tiny else "tiny LlamaModel (dry run)",
        "dtype": "bfloat16", "non_embedding_params": backbone.params(), "conversations": len(ids),
        "length_mean": float(lengths.mean()), "length_p50": float(np.median(lengths)),
        "length_max": int(lengths.max()), "max_tokens_per_batch": args.max_tokens_per_batch,
        "device_name": name, "spec_peak_bf16_tflops": None if peak is None else peak / 1e12,
        "measured_bf16_matmul_tflops": matmul / 1e12, "flops": flops,
        "one_at_a_time": {**way_result(s_single, lengths[:single_n], single_flops, peak, matmul),
                          "conversations": single_n},
        "batched_sdpa": way_result(s_batched, lengths, flops, peak, matmul, processed),
        "agreement_batched_vs_one_at_a_time": max_relative_error(h_batched[:single_n], torch.stack(h_single)),
    }
    attention = "flash_attention_2" if flash_attention_2() else "sdpa"
    ok, how = packed_support(attention)
    result["packed"] = {"attention": attention, "how": how, "available": ok, "tokens_per_row": args.packed_tokens}
    if ok:
        packer = backbone if attention == "sdpa" else RandomLlama(config, device, dtype, attention)
        packed(packer, warm, args.packed_tokens)
        s_packed, h_packed = packed(packer, ids, args.packed_tokens)
        result["packed"].update(way_result(s_packed, lengths, flops, peak, matmul))
        result["packed"]["agreement_vs_batched"] = max_relative_error(h_packed, torch.from_numpy(h_batched))
    result["speedup_batched_vs_one_at_a_time"] = (result["batched_sdpa"]["tokens_per_s"]
                                                  / result["one_at_a_time"]["tokens_per_s"])
    del backbone
    return result


def max_relative_error(a, b) -> float:
    """max |a - b| / max |b| over the rows compared (bf16 batching changes the last bits)."""
    a, b = torch.as_tensor(np.asarray(a, dtype=np.float32)), torch.as_tensor(b).float()
    return float((a - b).abs().max() / b.abs().max())


def heads(args, device) -> dict:
    """The two trainers on the GPU at full scale, through bench.train_heads's measurements."""
    from bench import train_heads

    ratings, pairs, dim = (2000, 4000, 64) if args.tiny else (20_000, 80_000, 4096)
    dev = str(device)
    return {"stage1": train_heads.bench_stage1(ratings, dim, 1, 1024, device=dev),
            "stage2": train_heads.bench_stage2(pairs, dim, dim, 512, steps=20 if not args.tiny else 2,
                                               warmup=2, device=dev)}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench gpu")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a dry run of every path)")
    ap.add_argument("--tiny", action="store_true", help="a tiny Llama and small heads: checks the code paths only")
    ap.add_argument("--conversations", type=int, default=2000)
    ap.add_argument("--one-at-a-time", type=int, default=200, help="conversations timed in the one-at-a-time loop")
    ap.add_argument("--max-tokens-per-batch", type=int, default=32768, help="ours: padded tokens per batch")
    ap.add_argument("--packed-tokens", type=int, default=8192, help="packed: tokens per packed row")
    ap.add_argument("--no-heads", action="store_true", help="skip the head trainers")
    ap.add_argument("--write-lengths", action="store_true", help="remake bench/conversation_lengths.json and stop")
    args = ap.parse_args(argv or [])
    if args.write_lengths:
        out = write_lengths()
        print(f"{sum(map(len, out['files'].values()))} conversation lengths -> {LENGTHS}")
        return out
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise NoGPU("error: make bench-gpu needs a CUDA GPU and torch sees none here "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                    "run it on a GPU machine (`python -m bench gpu --device cpu --tiny` dry-runs the code paths)")
    if device.type != "cuda" and not args.tiny:
        raise NoGPU("error: python -m bench gpu measures a GPU; on a CPU only the --tiny dry run is meaningful")
    import transformers

    result = {"what": __doc__.split("\n")[0], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "dry_run": args.tiny, "config": vars(args),
              "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                           "flash_attn": flash_attention_2()},
              "method": __doc__.split("Ways, in one run:")[1].strip()}
    result["extraction"] = extraction(args, device)
    if not args.no_heads:
        result["heads"] = heads(args, device)
    result["machine"] = machine_info()
    name = "gpu_dry_run" if args.tiny else "gpu"
    path = write_result(name, result) if not args.tiny else None
    e = result["extraction"]
    lines = [f"{e['device_name']}: {way}: {e[way]['tokens_per_s']:.0f} tok/s, MFU "
             f"{'n/a' if e[way]['mfu_of_spec_peak'] is None else format(e[way]['mfu_of_spec_peak'], '.1%')}, "
             f"{e[way]['share_of_measured_matmul']:.1%} of the measured matmul"
             for way in ("one_at_a_time", "batched_sdpa", "packed") if "tokens_per_s" in e[way]]
    print("\n".join(lines) + (f"\n-> {path}" if path else "\n(dry run: nothing written)"))
    return result


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) and 0)
