"""Rendering conversations into the token ids the backbone reads: chat template, then one BOS.

docs/method.md section 5: render with the tokenizer's chat template to text, tokenise that text with
``add_special_tokens=False`` (the template already wrote the special tokens), and make sure the ids
start with exactly one BOS when the tokenizer has one. Extraction, scoring and the exported model
all go through this one function, so the vector the heads see at training time is the one they see
at serving time.
"""

from __future__ import annotations

import hashlib
import json

from pipeline.errors import UserError

RENDER_VERSION = 1  # bump when the rendering rules change: caches made before are then refused


class TemplateError(UserError):
    """The tokenizer cannot render conversations."""


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer's own special-token policy starts every sequence with BOS."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def with_one_bos(ids: list[int], bos: int | None, required: bool) -> list[int]:
    """Drop doubled leading BOS tokens; prepend one when the tokenizer expects it and it is missing."""
    if bos is None:
        return ids
    start = 0
    while start + 1 < len(ids) and ids[start] == bos and ids[start + 1] == bos:
        start += 1
    ids = ids[start:]
    if required and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def render_texts(tokenizer, conversations: list[list[dict]]) -> list[str]:
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"the backbone's tokenizer ({type(tokenizer).__name__}) has no chat template; "
            "use a chat or reward model backbone, or set tokenizer.chat_template"
        )
    return [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]


def render_ids(tokenizer, conversations: list[list[dict]]) -> list[list[int]]:
    """Token ids of each conversation, exactly as the backbone must read them."""
    if not conversations:
        return []
    return encode_texts(tokenizer, render_texts(tokenizer, conversations))


def encode_texts(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of already-templated texts (the chat template's output, special tokens written out), by the
    same rule as ``render_ids``: no special tokens added, then exactly one leading BOS."""
    if not texts:
        return []
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    bos, required = tokenizer.bos_token_id, adds_bos(tokenizer)
    return [with_one_bos(list(ids), bos, required) for ids in encoded]


def chat_template_hash(tokenizer) -> str:
    """Identifies the rendering: template text, BOS policy and the rules' version."""
    key = {
        "template": getattr(tokenizer, "chat_template", None),
        "bos": tokenizer.bos_token,
        "adds_bos": adds_bos(tokenizer),
        "render_version": RENDER_VERSION,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
