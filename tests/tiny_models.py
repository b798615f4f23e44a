"""Tiny random Llama backbones, random heads on them and their exports, built offline for fast tests;
and the side environments an export is checked in (transformers 4.57, RewardBench's runner).

The tokenizer is Llama-3-like where it matters: its chat template writes the BOS itself, its
default encoding also adds a BOS (so tokenising templated text again gives two, the seed snippet's
case), every turn ends with EOS, and pad == EOS (so a conversation ends in a token equal to the pad id).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline import ATTRIBUTES

ROOT = Path(__file__).resolve().parents[1]
K = len(ATTRIBUTES)
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Explain gradient descent in simple words."},
     {"role": "assistant", "content": "Take small steps downhill on the loss, then repeat."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Thanks!"},
     {"role": "assistant", "content": "You are welcome."}],
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}"
)

CORPUS = [
    "What is the range of the numeric output of a sigmoid node in a neural network?",
    "The output of a sigmoid node is bounded between 0 and 1.",
    "Compute 17 plus 25. The answer is 42. Paris is the capital of France.",
    "Explain gradient descent in simple words, then give an example with numbers.",
    "<|user|> <|assistant|> <|system|> hello world, thanks! 0123456789",
]


def build_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on a few sentences: encodes any text, has BOS/EOS/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(directory: Path, reward_model: bool = False, seed: int = 0, hidden_size: int = 64) -> Path:
    """Save a random tiny Llama (base causal LM, or a 1-label sequence classifier) with its tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, num_labels=1,
    )
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if reward_model else LlamaForCausalLM)(config)
    if reward_model:  # a visible head: random init may be near zero
        torch.nn.init.normal_(model.score.weight, std=1.0)
    model.eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# A preset shaped like the demo's, on a tiny backbone ({model}) with every artifact under {root}.
TINY_PRESET = """
backbone = "{model}"
cache_dir = "{root}/cache"
heads_dir = "{root}/heads"
report_dir = "{root}/eval"
out_dir = "{root}/model"
device = "cpu"

[datasets.ratings]
kind = "ratings"
source = "synthetic:ratings?n=120&seed=0"

[datasets.preferences]
kind = "preferences"
source = "synthetic:preferences?n=120&seed=1"

[datasets.eval_ratings]
kind = "ratings"
source = "synthetic:ratings?n=40&seed=2"

[datasets.eval_preferences]
kind = "preferences"
source = "synthetic:preferences?n=40&seed=3"

[extract]
dtype = "auto-bf16"

[value_head]
batch_size = 32
epochs = 20

[gating]
gate_batch_size = 16
gate_epochs = 4
gate_hidden = 16

[evaluate]
eval_preferences = ["eval_preferences"]
eval_ratings = "eval_ratings"
"""


def slow_forward(seconds: float) -> str:
    """Python for a child process: every backbone forward pass sleeps ``seconds`` first, so that a test can
    interrupt an extraction mid-run."""
    return f"""
import time
import pipeline.features.embedding as embedding
fast = embedding.backbone_forward
def backbone_forward(*a, **k):
    time.sleep({seconds})
    return fast(*a, **k)
embedding.backbone_forward = backbone_forward
"""


# ----------------------------------------------------------------------------------------------
# Random heads on a tiny backbone, and their export


def build_published_checkpoint(directory: Path, seed: int = 3) -> Path:
    """A tiny checkpoint in the published URM layout, as SGLang's class reads it (tests/test_published_layout.py):
    config.json with architectures [the published class], model_type llama, 10 labels; model.* (a random tiny
    Llama), score.weight [10, d], weights.fc.* in float16."""
    import shutil

    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    from pipeline.model import PUBLISHED_ARCHITECTURE

    source = build_tiny_llama(directory.parent / f"{directory.name}-source", seed=seed)
    causal = LlamaForCausalLM.from_pretrained(source)
    config = causal.config
    d = config.hidden_size
    config.architectures, config.num_labels = [PUBLISHED_ARCHITECTURE], 2 * K
    config.tie_word_embeddings = False
    g = torch.Generator().manual_seed(seed)
    heads = {"score.weight": torch.randn(2 * K, d, generator=g) * 0.3,
             "weights.fc.0.weight": torch.randn(d, d, generator=g) * 0.2, "weights.fc.0.bias": torch.randn(d, generator=g) * 0.1,
             "weights.fc.2.weight": torch.randn(d, d, generator=g) * 0.2, "weights.fc.2.bias": torch.randn(d, generator=g) * 0.1,
             "weights.fc.4.weight": torch.randn(K, d, generator=g) * 0.2, "weights.fc.4.bias": torch.randn(K, generator=g) * 0.1}
    heads = {n: t.half() if n.startswith("weights.") else t for n, t in heads.items()}
    backbone = {f"model.{n}": t.contiguous() for n, t in causal.model.state_dict().items()}
    directory.mkdir(parents=True)
    save_file({**backbone, **heads}, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(directory)
    build_tokenizer().save_pretrained(directory)
    shutil.rmtree(source)
    return directory


def tokenizer_of(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory, trust_remote_code=False)  # an export's model_type urm: no prompt


def cache_identity_of(backbone_dir: Path, hidden_size: int):
    """The cache identity heads.json would hold had the heads been trained on a cache of this backbone."""
    from pipeline.features import chat_template_hash, weights_fingerprint
    from pipeline.model import CacheIdentity

    return CacheIdentity(path="cache/tiny/ratings", fingerprint="fp-tiny", backbone=str(backbone_dir),
                         backbone_revision=weights_fingerprint(backbone_dir),
                         chat_template_hash=chat_template_hash(tokenizer_of(backbone_dir)), hidden_size=hidden_size)


def heads_meta(heads, identity, **stages):
    """A HeadsMeta for ``heads`` as if stage 1 (nll) had been trained on the cache ``identity``."""
    from pipeline.model import HeadsMeta, StageRecord

    value = StageRecord(config={"loss": "nll"}, cache=identity, epochs_run=1, best_epoch=[1],
                        val={"mse": 0.5, "per_attribute": {}})
    return HeadsMeta(attributes=list(ATTRIBUTES), hidden_size=heads.d, architecture=heads.architecture,
                     value_head=value, **stages)


# Two label groups, as a closed-form fit with one attribute's labels missing on some rows gives: ranks below d (the
# part of h outside the rows' span counts) and one with a plain bias (c = 1)
RANDOM_POSTERIOR = [{"attributes": [0, 1, 3, 4], "rank": 8, "direction": True},
                    {"attributes": [2], "rank": 5, "direction": False}]


def random_posterior_(heads) -> None:
    """Seeded random ridge-posterior buffers of the right kinds: an orthonormal basis, positive weights."""
    with torch.no_grad():
        for group in heads.posterior:
            d, r = group.basis.shape
            group.basis.copy_(torch.linalg.qr(torch.randn(d, r))[0])
            group.outside.uniform_(0.5, 1.0)
            group.shrink.copy_(1.0 / (torch.rand(r).mul(5.0)[None, :] + 1.0 / group.outside[:, None]))
            group.noise.uniform_(0.1, 0.5)
            group.center.normal_(0.0, 0.1)
            if group.direction is not None:
                group.direction.normal_(0.0, 0.1)
            group.column.fill_(0.01)


def random_heads_dir(directory: Path, backbone_dir: Path, d: int = 64, members: int = 1, gate: str | None = "urm",
                     bias: bool = False, seed: int = 0, identity=None, gate_hidden: int = 16,
                     posterior: bool = False) -> Path:
    """A heads folder with seeded random heads (weights visibly non-zero) claiming ``backbone_dir``
    (``gate_hidden`` = d: the published URM's gate width, which SGLang's class takes); ``posterior``: with a random
    ridge posterior (``RANDOM_POSTERIOR``), so the heads state epistemic_std."""
    from pipeline.model import Heads, save_heads

    torch.manual_seed(seed)
    heads = Heads(d, K, members=members, bias=bias, gate=gate, gate_hidden=gate_hidden if gate else None,
                  posterior=RANDOM_POSTERIOR if posterior else None)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.2)
    if posterior:
        random_posterior_(heads)
    save_heads(directory, heads, heads_meta(heads, identity or cache_identity_of(backbone_dir, d)))
    return directory


def export_tiny(root: Path, *, reward_model: bool = False, members: int = 1, gate: str | None = "urm",
                bias: bool = False, backbone: Path | None = None, name: str = "model",
                gate_hidden: int = 16, posterior: bool = False) -> tuple[Path, Path, Path]:
    """(backbone dir, heads dir, export dir) of a tiny Llama with random heads, exported."""
    from pipeline.configs import ExportConfig
    from pipeline.recipes.export import export_model

    bb = backbone or build_tiny_llama(root / "backbone", reward_model=reward_model)
    heads = random_heads_dir(root / f"heads-{name}", bb, members=members, gate=gate, bias=bias, gate_hidden=gate_hidden,
                             posterior=posterior)
    out = root / name
    export_model(ExportConfig(backbone=str(bb), heads_dir=str(heads), out_dir=str(out)))
    return bb, heads, out


def load_export(directory, **kwargs):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(directory, trust_remote_code=True, **kwargs).eval()


# ----------------------------------------------------------------------------------------------
# Side environments: transformers 4.57 and RewardBench's runner, installed beside the venv by make

TF457 = ROOT / ".venv-tf457"
TF457_VERSION = "4.57.6"
REWARDBENCH = ROOT / ".venv-rewardbench"

# Scores under whatever transformers is importable: the rendered ids as given, and the seed snippet's
# way (templated text tokenised again, so a second BOS where the tokenizer adds one).
SCRIPT = r'''
import json, sys, torch, transformers
from transformers import AutoModelForSequenceClassification, AutoTokenizer
model_dir, inputs = sys.argv[1], json.loads(open(sys.argv[2]).read())
model = AutoModelForSequenceClassification.from_pretrained(model_dir, device_map="auto", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
with torch.no_grad():
    ids = [model(torch.tensor([x], device=model.device)).logits[0][0].item() for x in inputs["ids"]]
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in inputs["conversations"]]
    snippet = [model(**tokenizer(t, return_tensors="pt").to(model.device)).logits[0][0].item() for t in texts]
    outs = [model(torch.tensor([x], device=model.device)) for x in inputs["ids"]]
    epistemic = [o.epistemic_std[0].item() if o.epistemic_std is not None else None for o in outs]
print(json.dumps({"version": transformers.__version__, "ids": ids, "snippet": snippet, "epistemic": epistemic}))
'''


def require_side_env(path: Path, what: str) -> Path:
    """A side environment `make install` builds, or a skip (a plain pytest run) / a failure
    (URM_REQUIRE_COMPAT=1, as `make test` and so CI set it)."""
    if not path.is_dir() or not any(path.iterdir()):
        reason = f"{path} not found: {what} is installed there by `make install` (or `make test`), which CI runs"
        if os.environ.get("URM_REQUIRE_COMPAT") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


def require_tf457() -> Path:
    return require_side_env(TF457, f"transformers {TF457_VERSION}")


def scores_under(model_dir: Path, conversations, ids, tmp_path: Path, tf457: bool = True) -> dict:
    """Run SCRIPT in a fresh interpreter, under transformers 4.57 (tf457) or the installed 5.x."""
    (tmp_path / "score_script.py").write_text(SCRIPT)
    inputs = tmp_path / "inputs.json"
    inputs.write_text(json.dumps({"conversations": conversations, "ids": ids}))
    env = {**os.environ, "PYTHONPATH": str(require_tf457()) if tf457 else "", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, str(tmp_path / "score_script.py"), str(model_dir), str(inputs)],
                          capture_output=True, text=True, env=env, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def scores_here(model_dir: Path, conversations, ids) -> dict:
    """SCRIPT's numbers under the installed transformers 5.x, in this process."""
    model, tokenizer = load_export(model_dir), tokenizer_of(model_dir)
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    with torch.no_grad():
        outs = [model(torch.tensor([x])) for x in ids]
        return {"ids": [o.logits[0][0].item() for o in outs],
                "snippet": [model(**tokenizer(t, return_tensors="pt")).logits[0][0].item() for t in texts],
                "epistemic": [o.epistemic_std[0].item() if o.epistemic_std is not None else None for o in outs]}
