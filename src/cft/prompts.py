"""Prompt templates, pinned by name and recorded with every artifact.

``chat``: the question as the user turn of the tokenizer's chat template (the testbed's default).
``qwen25-math-cot``: the Qwen2.5-Math toolkit's prompt, a system turn asking for a boxed answer.
``gsm8k``: plain ``Question: ...\\nAnswer:`` text, for models without a chat template.
A path to a text file with a ``{question}`` placeholder is a user template (rendered as plain text).
"""

from __future__ import annotations

from pathlib import Path

QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN = {"gsm8k": "Question: {question}\nLet's think step by step. At the end, write '#### N'.\nAnswer:"}


def template_text(name: str) -> str | None:
    """The literal text of a plain template, or None for chat-based templates (recorded in metadata)."""
    if name in PLAIN:
        return PLAIN[name]
    if name in ("chat", "qwen25-math-cot"):
        return None
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt template {name!r} is neither built in (chat, qwen25-math-cot, gsm8k) nor a file")
    text = path.read_text()
    if "{question}" not in text:
        raise ValueError(f"{path}: a prompt template file needs a {{question}} placeholder")
    return text


def render_ids(tok, question: str, template: str = "chat") -> list[int]:
    """Token ids of the prompt; the response is decoded right after them."""
    plain = template_text(template)
    if plain is None and tok.chat_template:
        messages = [{"role": "user", "content": question}]
        if template == "qwen25-math-cot":
            messages.insert(0, {"role": "system", "content": QWEN_SYSTEM})
        return list(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = (plain or "Question: {question}\nAnswer:").replace("{question}", question)
    ids = tok(text, add_special_tokens=True).input_ids
    return list(ids)
