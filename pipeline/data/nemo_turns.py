"""The turn markers of NVIDIA's data formats (HelpSteer2, SteerLM, NeMo-Aligner) and a prompt split on them.

HelpSteer2 joins a multi-turn prompt's earlier turns with ``<extra_id_1>Assistant`` / ``<extra_id_1>User``
markers; NeMo-Aligner's regression format opens with ``<extra_id_0>System`` and closes the judged
turn with ``<extra_id_2>`` (where the attribute labels would start). The rating loaders
(``pipeline.data.ratings``) and the synthetic generator (``pipeline.data.synthetic``) both split
prompts here.
"""

from __future__ import annotations

import re

from pipeline.data.records import Message

TURN_MARKER = re.compile(r"<extra_id_1>(User|Assistant)")
SYSTEM_MARKER = "<extra_id_0>System"
LABEL_MARKER = "<extra_id_2>"
TURN_USER = "\n<extra_id_1>User\n"  # what goes between turns, as HelpSteer2 writes it
TURN_ASSISTANT = "\n<extra_id_1>Assistant\n"


def split_helpsteer2_prompt(prompt: str) -> list[Message]:
    """``"q1\\n<extra_id_1>Assistant\\na1\\n<extra_id_1>User\\nq2"`` -> user/assistant/user turns, each stripped."""
    parts = TURN_MARKER.split(prompt)
    turns = [{"role": "user", "content": parts[0].strip()}]
    if len(parts) > 1 and not turns[0]["content"]:
        turns = []  # the prompt opens with a marker
    for i in range(1, len(parts), 2):
        turns.append({"role": parts[i].lower(), "content": parts[i + 1].strip()})
    return turns

