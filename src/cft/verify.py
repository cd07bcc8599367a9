"""Answer extraction and equivalence: the verdicts that decide every critical-token label.

Public API: ``extract_answer(text) -> str | None`` and ``is_equivalent(prediction, gold) -> bool``.
Extraction follows the Qwen2.5-Math toolkit's order: the last ``\\boxed{}``, else "the answer is",
else GSM8K's ``#### N``, else the last number. ``answer_complete`` tells a decoder when a final
answer can no longer change, so branches can stop early.
"""

from __future__ import annotations

import math
import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]*?)\$?\s*(?:\.\s|\.$|\n|$)", re.IGNORECASE)
_HASHES = re.compile(r"####\s*([^\n]+)")
_ANSWER_DONE = re.compile(r"(answer is[^\n]*?\.\s)|(####[^\n]*\S[^\n]*\n)", re.IGNORECASE)


def _last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    while start >= 0:
        i = text.find("{", start)
        if i < 0:
            break
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j]
        start = max(text.rfind("\\boxed", 0, start), text.rfind("\\fbox", 0, start))
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None when it states none."""
    if not isinstance(text, str) or not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    matches = _ANSWER_IS.findall(text)
    if matches and matches[-1].strip():
        return matches[-1].strip().rstrip(".")
    matches = _HASHES.findall(text)
    if matches:
        return matches[-1].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].rstrip(".")
    return None


def answer_complete(text: str) -> bool:
    """True once the text holds a final answer that further tokens cannot extend.

    A closed ``\\boxed{}``, "the answer is X." followed by whitespace, or a ``#### N`` line ended by a
    newline. Decoders stop a continuation here (the same rule in every engine, so labels agree).
    """
    if ("\\boxed" in text or "\\fbox" in text) and _last_boxed(text) is not None:
        return True
    return _ANSWER_DONE.search(text) is not None


def _to_number(s: str) -> float | None:
    s = s.strip().strip("$").replace(",", "").replace("\\!", "").replace(" ", "")
    s = s.rstrip(".")
    if s.endswith("\\%") or s.endswith("%"):
        s = s.rstrip("%").rstrip("\\")
    frac = re.fullmatch(r"(-?)\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}", s)
    if frac:
        try:
            value = float(frac.group(2)) / float(frac.group(3))
        except (ValueError, ZeroDivisionError):
            return None
        return -value if frac.group(1) else value
    simple = re.fullmatch(r"(-?[\d.]+)/(-?[\d.]+)", s)
    if simple:
        try:
            return float(simple.group(1)) / float(simple.group(2))
        except (ValueError, ZeroDivisionError):
            return None
    try:
        value = float(s)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def normalize(s: str) -> str:
    s = s.strip().strip("$").strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\left", "").replace("\\right", "")
    return re.sub(r"\s+", "", s).rstrip(".")


def is_equivalent(prediction: str | None, gold: str | None) -> bool:
    """Numeric equivalence with relative tolerance 1e-4, else equality after normalisation."""
    if prediction is None or gold is None:
        return False
    p, g = _to_number(str(prediction)), _to_number(str(gold))
    if p is not None and g is not None:
        return math.isclose(p, g, rel_tol=1e-4, abs_tol=1e-8)
    return normalize(str(prediction)) == normalize(str(gold))


def grade(text: str, gold: str) -> tuple[str | None, bool]:
    """Extract then compare: ``(prediction, correct)``."""
    pred = extract_answer(text)
    return pred, is_equivalent(pred, gold)
