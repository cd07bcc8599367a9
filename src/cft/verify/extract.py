"""Answer extraction (the Qwen2.5-Math toolkit's order) and the early-stop rule built on it."""

from __future__ import annotations

import re
from collections import deque

from cft.verify.equivalence import (
    BRACE,
    MAX_SYMBOLIC_CHARS,
    TIME,
    balanced,
    clean,
    is_prose,
    parse_number,
    split_assignment,
)

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####[ \t]*([^\n]*\S)")
ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
PERIOD_SPACE = re.compile(r"\.\s")
BOX = re.compile(r"\\boxed|\\fbox")
_TOKEN = re.compile(r"[^\s$]+")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` (or ``\\fbox``), braces balanced; ``\\boxed 5`` too."""
    return _last_boxed(text, bare=True)


def _last_boxed(text: str, bare: bool) -> str | None:
    """Linear time: a candidate whose braces do not close before the next candidate starts cannot close
    later (the later one's open brace keeps the depth above zero), so each span is scanned once.
    ``bare`` also accepts ``\\boxed 5``, which a decoder cannot treat as final (``\\boxed 5`` may become 50).
    """
    end = len(text)
    for match in reversed(list(BOX.finditer(text))):
        i = match.end()
        while i < end and text[i] in " \t":
            i += 1
        if i < end and text[i] == "{":
            depth = 0
            for brace in BRACE.finditer(text, i, end):
                if len(brace.group()) == 2:
                    continue
                depth += 1 if brace.group() == "{" else -1
                if depth == 0:
                    return text[i + 1 : brace.start()]
            end = match.start()
        elif bare and (i > match.end() or (i < end and not text[i].isalpha())):
            token = _TOKEN.match(text, i, end)
            if token:
                return token.group()
    return None


def _after_answer_is(text: str) -> str | None:
    """What follows the last "answer is" on its line, up to a sentence-ending period."""
    last = deque(ANSWER_IS.finditer(text), maxlen=1)
    if not last:
        return None
    start = last[0].end()
    line_end = text.find("\n", start)
    tail = text[start : line_end if line_end >= 0 else len(text)]
    stop = PERIOD_SPACE.search(tail)
    return stated_answer(tail[: stop.start()] if stop else tail) or None


def extract_answer(text: str) -> str | None:
    """The final answer of a response, or None when it states none."""
    if not isinstance(text, str) or not text:
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    stated = _after_answer_is(text)
    if stated is not None:
        return stated
    hashes = _HASHES.findall(text)
    if hashes:
        return hashes[-1].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1]
    return None


def answer_complete(text: str) -> bool:
    """True once the text holds a final answer that parses (``answer_parses``) and tokens cannot extend.

    A closed ``\\boxed{X}``, "the answer is X." followed by whitespace, or a ``#### X`` line ended by a
    newline, where X parses as an answer; "the answer is not obvious." never stops a response. Under the
    opt-in ``--stop-at-answer`` speed knob decoders stop a response or branch here (the same rule in every
    engine); by default they decode to EOS or the cap. The rule looks at the first complete answer only: a
    response that boxes 5 and later corrects itself to 7 stops at 5 (and is graded 5, where the evaluation
    grades 7), so a run with the knob audits what it changed; ``benchmarks/stop_rule.py`` measures it.
    """
    if ("\\boxed" in text or "\\fbox" in text) and answer_parses(_last_boxed(text, bare=False)):
        return True
    line_end = stop = -1
    for match in ANSWER_IS.finditer(text):  # "answer is X." then whitespace, on one line
        if match.start() >= line_end:  # a new line: where it ends and its first sentence end
            newline = text.find("\n", match.end())
            line_end = len(text) if newline < 0 else newline + 1
            stop = -1
        if stop < match.end():  # each stretch of the line is searched once (linear in the line's length)
            found = PERIOD_SPACE.search(text, match.end(), line_end)
            stop = found.start() if found else line_end
        if stop < line_end and answer_parses(stated_answer(text[match.end() : stop])):
            return True
    start = text.find("####")
    while start >= 0:  # "#### X" then a newline
        newline = text.find("\n", start)
        if newline < 0:
            return False
        if answer_parses(text[start + 4 : newline].strip()):
            return True
        start = text.find("####", newline)
    return False


def stated_answer(tail: str) -> str:
    """The answer in "answer is: $X$" as extraction reads it (``_after_answer_is``)."""
    return tail.lstrip(" \t:").strip().rstrip(".").strip().strip("$").strip()


_FORMULA = re.compile(r"[\d\\=+\-*/^(){}\[\]<>|]")
_LONE_LETTER = re.compile(r"\(?[A-Za-z]\)?")


def answer_parses(answer: str | None) -> bool:
    """Whether a stated final answer is one: a number (units allowed), a choice letter, a clock time or a
    formula without prose. "not obvious", "a bit more complex" or "" are not: the early stop waits for them.
    """
    if not answer or len(answer) > MAX_SYMBOLIC_CHARS:
        return False
    s = split_assignment(clean(answer))[1]
    if not s or not balanced(s):
        return False
    if parse_number(s) is not None or TIME.fullmatch(s) or _LONE_LETTER.fullmatch(s):
        return True
    return _FORMULA.search(s) is not None and not is_prose(s)

