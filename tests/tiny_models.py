"""Tiny random Llama backbones and a small BPE tokenizer with a BOS, built offline for fast tests.

The tokenizer is Llama-3-like where it matters: its chat template writes the BOS itself, its
default encoding also adds a BOS (so tokenising templated text again gives two, the seed snippet's
case), every turn ends with EOS, and pad == EOS (so a conversation ends in a token equal to the pad id).
"""

from __future__ import annotations

from pathlib import Path

import torch

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
