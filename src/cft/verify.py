"""Answer extraction and equivalence: the verdicts that decide every critical-token label.

Public API: ``extract_answer(text) -> str | None``, ``is_equivalent(prediction, gold) -> bool``,
``grade(text, gold) -> (prediction, correct)`` and ``grade_detailed`` / ``check`` which also say how a
verdict was reached and whether it timed out or failed. Extraction follows the Qwen2.5-Math toolkit's
order: the last ``\\boxed{}``, else "the answer is", else GSM8K's ``#### N``, else the last number.
``answer_complete`` tells a decoder when a final answer can no longer change, so branches can stop early.

Equivalence runs cheapest first and stops at the first conclusive step:

1. numbers (exact for integers and fractions, relative tolerance 1e-4 once a decimal is involved;
   thousands separators, ``\\frac``/``\\dfrac``, mixed numbers, percent, units, ``\\$``, degrees,
   ``x = 5``, scientific notation, repeating decimals, number words);
2. normalised strings; a gold that is a lone choice letter A-E; plain-text answers (``shortage``);
3. guards for inputs math-verify gets wrong (below);
4. symbolic comparison with math-verify (intervals, sets, tuples, expressions, equations) in a
   separate worker process with a hard wall-clock timeout per item.

Only step 4 leaves this process, so the hot loop of branch verdicts (mostly numbers) never waits on
it. Verdicts are cached (LRU keyed by ``(prediction, gold)``).

Why a worker process: math-verify's own timeouts use ``SIGALRM``, which works only in a main thread,
and sympy can get stuck where no signal is handled (C code, broad ``except`` clauses). The worker arms
its own alarm (soft limit); if it does not answer within the limit plus a grace period it is killed and
a new one is started in the background. The item is graded False with ``timed_out=True``; an exception
or a dead worker marks only that item (``error``). ``stats()`` counts both.

math-verify 0.9 false positives found by experiment, and the guard that handles each:

- digit groups separated by spaces are summed: ``"1 1"`` == 2, ``"2 3"`` == 5, ``"3 1/2"`` == 2, and a
  space used as a thousands separator multiplies: ``"1 000"`` == 0 (also ``"1\\,000"``). Numbers are
  parsed here first (``1 000`` = 1000, ``3 1/2`` = 7/2) and sent on in canonical form; other runs of
  space-separated digits never reach math-verify.
- letters are commuting symbols, so anagrams match: ``"Amy"`` == ``"May"``, ``"no"`` == ``"on"``,
  ``"tea"`` == ``"eat"``. Plain-word answers are compared as text.
- a choice letter ``"E"`` is read as Euler's e, so ``"e"`` matches it. A gold that is a lone letter A-E
  is compared as a choice.
- a clock time is a ratio: ``"1:9"`` == ``"5:45"``. Times are compared as times.
- a set-builder gold ``\\{x|-2\\leq x<1\\}`` parses as the number 1, so a bare ``1`` matches it. A set
  builder with one inequality chain is rewritten to it (``-2\\leq x<1``), which math-verify compares
  with intervals; other set builders (``\\{x|x=3k,k\\in\\mathbb{Z}\\}`` == 3) are compared as strings.
- a piecewise function (``\\left\\{\\begin{array}...`` or ``cases``) parses as a number from one of its
  conditions (``6`` matched ``6p+1.5 if 1<=p<=5; 5.5p if p>=6``): compared as strings.
- prose and multi-line LaTeX: parsing falls back to one number in the text, so ``"1"`` matched
  ``"radius: 1, center: (2,3,5)"`` and ``"4"`` matched ``"Solution is: [x=2t+1, y=4t, z=t]"``; a
  matrix written over several lines matched one of its entries. Answers with words (three letters or more,
  beyond LaTeX commands, function names and "and") are compared as strings; newlines become spaces.
- a roster set ``\\{1,2\\}`` matches the ordered pair/interval ``(1,2)`` (but ``\\{2,1\\}`` does not). A
  predicted set never matches a gold tuple or interval here.
- ``0.\\overline{3}`` parses as 0; repeating decimals are parsed here (1/3).

Behaviour kept on purpose (same as the Qwen toolkit and math-verify): a percent sign on one side is
optional (``50\\%`` == 50 == 0.5), units and ``x =`` are ignored (but ``x = 2`` is not ``y = 2``), a
degenerate interval ``[5,5]`` equals 5, and for a chain ``a = b = c`` only the last side counts. Not
equal here although some harnesses accept it: 50 vs 0.5 without a percent sign; a product of letters
written as a word (``abc`` vs ``bca``), which the prose rule compares as text.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import socket
import subprocess
import sys
import threading
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 5.0  # seconds of symbolic comparison per item
TIMEOUT_GRACE = 1.0  # extra seconds before a worker that ignores its own alarm is killed
STARTUP_TIMEOUT = 180.0  # a fresh worker imports sympy and math-verify; slow on a loaded machine
MAX_SYMBOLIC_CHARS = 1000  # longer "answers" are compared as strings only
MAX_ANSWER_CHARS = 5000  # longer ones are compared verbatim, without any parsing
WORKER_MEMORY_LIMIT = 4 << 30  # address-space cap of the worker, so a blow-up fails fast
CACHE_SIZE = 200_000
REL_TOL = 1e-4

_settings = {"timeout": DEFAULT_TIMEOUT, "cache_size": CACHE_SIZE}


# --------------------------------------------------------------------------- extraction

_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?|-?\.\d+")
_HASHES = re.compile(r"####[ \t]*([^\n]*\S)")
_ANSWER_IS = re.compile(r"answer is", re.IGNORECASE)
_PERIOD_SPACE = re.compile(r"\.\s")
_BOX = re.compile(r"\\boxed|\\fbox")
_BRACE = re.compile(r"\\[{}]|[{}]")  # a set's \{ and \} are literal characters: matched, then skipped
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
    for match in reversed(list(_BOX.finditer(text))):
        i = match.end()
        while i < end and text[i] in " \t":
            i += 1
        if i < end and text[i] == "{":
            depth = 0
            for brace in _BRACE.finditer(text, i, end):
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
    last = deque(_ANSWER_IS.finditer(text), maxlen=1)
    if not last:
        return None
    start = last[0].end()
    line_end = text.find("\n", start)
    tail = text[start : line_end if line_end >= 0 else len(text)]
    stop = _PERIOD_SPACE.search(tail)
    return _stated(tail[: stop.start()] if stop else tail) or None


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
    newline, where X parses as an answer; "the answer is not obvious." never stops a response. Decoders
    stop a continuation here (the same rule in every engine, so labels agree). The rule looks at the
    first complete answer only: a response that boxes 5 and later corrects itself to 7 stops at 5 (and
    is graded 5); ``benchmarks/stop_rule.py`` measures how often labels differ from decoding to EOS.
    """
    if ("\\boxed" in text or "\\fbox" in text) and answer_parses(_last_boxed(text, bare=False)):
        return True
    line_end = stop = -1
    for match in _ANSWER_IS.finditer(text):  # "answer is X." then whitespace, on one line
        if match.start() >= line_end:  # a new line: where it ends and its first sentence end
            newline = text.find("\n", match.end())
            line_end = len(text) if newline < 0 else newline + 1
            stop = -1
        if stop < match.end():  # each stretch of the line is searched once (linear in the line's length)
            found = _PERIOD_SPACE.search(text, match.end(), line_end)
            stop = found.start() if found else line_end
        if stop < line_end and answer_parses(_stated(text[match.end() : stop])):
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


def _stated(tail: str) -> str:
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
    s = _split_assignment(_clean(answer))[1]
    if not s or not _balanced(s):
        return False
    if _number(s) is not None or _TIME.fullmatch(s) or _LONE_LETTER.fullmatch(s):
        return True
    return _FORMULA.search(s) is not None and not _is_prose(s)


# --------------------------------------------------------------------------- normalisation

_UNIT_COMMAND = re.compile(  # trailing units, also compound ones: 5 \mathrm{~m} / \mathrm{s}, 3 \text{ cm}^2
    r"(?:\s*(?:(?:/|\\cdot)\s*)?\\(?:text|textrm|mbox|mathrm)\s*\{[^{}]*\}(?:\s*\^\s*\{?-?\d\}?)?)+\s*$")
_TEXT_COMMAND = re.compile(r"\\(?:text|textrm|textbf|textit|mbox|mathrm|mathbf|operatorname)\s*\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"([A-Za-z](?:_\{?\w+\}?)?)\s*=\s*(?=[^=]+$)")
_SIZING = re.compile(r"\\(?:left|right|displaystyle)(?![A-Za-z])")  # keeps \leftarrow
_DEGREES = re.compile(r"\^\s*\{?\\circ\}?|°|\\degree")
_SPACING = re.compile(r"\\[,;:! ]|~|\s+")
_WRAPPERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("\\boxed{", "}"))


def _unwrap(s: str) -> str:
    for _ in range(4):
        before = s
        for left, right in _WRAPPERS:
            if s.startswith(left) and s.endswith(right) and len(s) >= len(left) + len(right):
                inner = s[len(left) : len(s) - len(right)]
                if right != "}" or _balanced(inner):
                    s = inner.strip()
        if s == before:
            break
    return s


def _balanced(s: str) -> bool:
    depth = 0
    for brace in _BRACE.finditer(s):
        if len(brace.group()) == 2:
            continue
        depth += 1 if brace.group() == "{" else -1
        if depth < 0:
            return False
    return depth == 0


def _clean(s: str) -> str:
    """Remove what never changes an answer's value: delimiters, units, degrees, currency, ``x =``."""
    s = _unwrap(str(s).replace("\u2212", "-").strip())
    s = s.rstrip(".").strip()
    s = _SIZING.sub("", s.replace("\\!", ""))
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _DEGREES.sub("", s).replace("\\$", "").replace("$", "")
    for _ in range(2):
        stripped = _UNIT_COMMAND.sub("", s).strip()
        if stripped and stripped != s:
            s = stripped
    return _TEXT_COMMAND.sub(r"\1", s).strip()


def _split_assignment(s: str) -> tuple[str | None, str]:
    """``"x = 5"`` -> ``("x", "5")``: a single-letter left side names the answer, it is not part of it."""
    m = _ASSIGNMENT.match(s)
    return (m.group(1), s[m.end() :].strip()) if m else (None, s)


def normalize(s: str) -> str:
    """Canonical string form used for exact comparison: cleaned, ``x =`` dropped, all spacing removed."""
    return _SPACING.sub("", _split_assignment(_clean(s))[1]).replace("{,}", ",").rstrip(".")


# --------------------------------------------------------------------------- numbers

_PLAIN = re.compile(r"-?\d{1,50}(?:\.\d{1,50})?")
_SEP = r"(?:,|\{,\}|\\,|\\ | )"
_DEC = rf"(?:\d{{1,3}}(?:{_SEP}\d{{3}})+|\d+)(?:\.\d*)?|\.\d+"
_SIGNED = rf"[-+]?(?:{_DEC})"
_NUM_PATTERNS = [
    ("repeat", re.compile(r"(\d*)\.(\d*)\\overline\{?(\d+)\}?")),
    ("sci", re.compile(rf"({_DEC})\s*(?:\\times|\\cdot|\*|x)\s*10\s*\^\s*\{{?\s*([-+]?\d+)\s*\}}?")),
    ("exp", re.compile(rf"({_DEC})[eE]([-+]?\d+)")),
    ("mixed", re.compile(r"(\d+)\s*\\frac\s*\{\s*(\d+)\s*\}\s*\{\s*(\d+)\s*\}|(\d+)\s+(\d+)\s*/\s*(\d+)")),
    ("frac", re.compile(
        rf"\\frac\s*\{{\s*({_SIGNED})\s*\}}\s*\{{\s*({_SIGNED})\s*\}}|\\frac(\d)(\d)|({_SIGNED})\s*/\s*({_SIGNED})"
    )),
    ("dec", re.compile(_DEC)),
]
_UNIT_WORDS = re.compile(r"(?<=[\d}])\s+[A-Za-z]{2,}\.?(?:\s+[A-Za-z]{2,}\.?)*$")
_NOT_UNITS = {"pi", "sqrt", "and", "or", "to", "times", "cdot", "hundred", "thousand", "million", "billion", "dozen"}
_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
_WORD_VALUES = {w: i for i, w in enumerate(_ONES)} | {w: 10 * (i + 2) for i, w in enumerate(_TENS)}
_MAX_EXPONENT = 400


@dataclass(frozen=True)
class _Num:
    value: Fraction
    approx: bool  # written with decimals: compared with a relative tolerance
    percent: bool
    text: str  # canonical form handed to math-verify


def _dec(s: str) -> Fraction:
    return Fraction(re.sub(_SEP, "", s))


def _word_number(s: str) -> int | None:
    parts = re.split(r"[\s-]+", s.lower())
    if len(parts) == 1 and parts[0] in _WORD_VALUES:
        return _WORD_VALUES[parts[0]]
    if len(parts) == 2 and parts[0] in _WORD_VALUES and parts[1] in _WORD_VALUES:
        tens, ones = _WORD_VALUES[parts[0]], _WORD_VALUES[parts[1]]
        if tens >= 20 and tens % 10 == 0 and 0 < ones < 10:
            return tens + ones
    return None


def _parse_unsigned(s: str) -> tuple[Fraction, bool] | None:
    for kind, pattern in _NUM_PATTERNS:
        m = pattern.fullmatch(s)
        if not m:
            continue
        if kind == "repeat":
            whole, fixed, rep = m.group(1) or "0", m.group(2), m.group(3)
            base = Fraction(int(whole)) + (Fraction(int(fixed), 10 ** len(fixed)) if fixed else 0)
            return base + Fraction(int(rep), (10 ** len(rep) - 1) * 10 ** len(fixed)), False
        if kind in ("sci", "exp"):
            exponent = int(m.group(2))
            if abs(exponent) > _MAX_EXPONENT:
                return None
            return _dec(m.group(1)) * Fraction(10) ** exponent, True
        if kind == "mixed":
            g = [x for x in m.groups() if x is not None]
            if int(g[2]) == 0:
                return None
            return int(g[0]) + Fraction(int(g[1]), int(g[2])), False
        if kind == "frac":
            g = [x for x in m.groups() if x is not None]
            num, den = _dec(g[0]), _dec(g[1])
            if den == 0:
                return None
            return num / den, "." in g[0] + g[1]
        return _dec(s), "." in s
    word = _word_number(s)
    return (Fraction(word), False) if word is not None else None


def _number(s: str) -> _Num | None:
    """The value of a cleaned answer that is a single plain number, else None."""
    if len(s) > 200:
        return None
    percent = s.endswith("%")
    if percent:
        s = s[:-2] if s.endswith("\\%") else s[:-1]
        s = s.strip()
    units = _UNIT_WORDS.search(s)
    if units:
        words = set(units.group().lower().replace(".", " ").split())
        if words & _NOT_UNITS:
            return None
        percent = percent or "percent" in words
        s = s[: units.start()]
    sign = 1
    for _ in range(2):
        if len(s) > 2 and (s[0], s[-1]) in (("(", ")"), ("{", "}")):
            s = s[1:-1].strip()
        if s[:1] in ("-", "+"):
            sign = -sign if s[0] == "-" else sign
            s = s[1:].strip()
    try:
        parsed = _parse_unsigned(s)
    except (ValueError, ZeroDivisionError, OverflowError):  # e.g. more digits than int() accepts
        return None
    if parsed is None:
        return None
    value, approx = sign * parsed[0], parsed[1]
    return _Num(value, approx, percent, _canonical(value, approx))


def _plain_number(s: str) -> _Num:
    return _Num(Fraction(s), "." in s, False, s)


def _canonical(value: Fraction, approx: bool) -> str:
    """``7/2`` for exact values, the plain decimal (never ``e`` notation) for decimals."""
    if value.denominator == 1 or not approx:
        return str(value)
    with localcontext() as ctx:
        ctx.prec = 60
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def _numbers_match(a: _Num, b: _Num) -> bool:
    for x in (a.value, a.value / 100) if a.percent else (a.value,):
        for y in (b.value, b.value / 100) if b.percent else (b.value,):
            if x == y:
                return True
            if a.approx or b.approx:
                try:
                    if math.isclose(float(x), float(y), rel_tol=REL_TOL):
                        return True
                except OverflowError:
                    continue
    return False


# --------------------------------------------------------------------------- choices, text, guards

_CHOICE_GOLD = re.compile(r"\(?([A-E])\)?")
_CHOICE_PRED = re.compile(r"(?:(?:option|choice)\s*)?(?:\(([A-E])\)|([A-E])(?:$|[.:)]))", re.IGNORECASE)
_WORDS = re.compile(r"[A-Za-z][A-Za-z'. -]*")
_TIME = re.compile(r"(\d{1,2}):(\d{2})\s*(?:([ap])\.?\s*m\.?)?", re.IGNORECASE)
_DIGIT_RUN = re.compile(r"-?\d+(?:\s+\d+)+")
_ENVIRONMENT = re.compile(r"\\(?:begin|end)\s*\{[^{}]*\}(?:\s*\{[lcr|\s]*\})?")
_COMMAND_NAME = re.compile(r"\\[A-Za-z]+")
_PROSE_WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]{3,}(?![A-Za-z(])")
_SHORT_WORD = re.compile(r"(?<![A-Za-z])[A-Za-z]{2}(?![A-Za-z(])")
_SHORT_WORDS = {"at", "is", "so", "of", "to"}  # English only: "by", "an", "ab" are also products of variables
_NOT_PROSE = {"and", "sin", "cos", "tan", "cot", "sec", "csc", "log", "exp", "lcm", "gcd", "max", "min", "mod", "det"}
_PIECEWISE = re.compile(r"\\begin\{cases\}|\\\{\s*\\begin\{array\}")
_SET_BUILDER = re.compile(r"\\\{\s*([A-Za-z])\s*(?:\||\\mid|:)\s*(.+)\\\}", re.DOTALL)
_INEQUALITY = re.compile(r"<|>|\\[lg]eq?(?![A-Za-z])|\\[lg]t(?![A-Za-z])|\\leqslant|\\geqslant")


def _choice_letter(s: str) -> str | None:
    """The option a prediction names: ``B``, ``(B)``, ``(B) 5``, ``B. 5``, ``B) 5``, ``option b``."""
    m = _CHOICE_PRED.match(s)
    return (m.group(1) or m.group(2)).upper() if m else None


def _same_time(a: re.Match, b: re.Match) -> bool:
    """Clock times: hours and minutes agree, and a.m./p.m. too when both give it."""
    same_clock = (int(a.group(1)), a.group(2)) == (int(b.group(1)), b.group(2))
    return same_clock and (not a.group(3) or not b.group(3) or a.group(3).lower() == b.group(3).lower())


def _is_words(s: str) -> bool:
    return bool(_WORDS.fullmatch(s)) and re.search(r"[A-Za-z]{2}", s) is not None


def _is_roster_set(s: str) -> bool:
    return s.startswith("\\{") and s.endswith("\\}") and not _SET_BUILDER.fullmatch(s)


def _is_tuple_or_interval(s: str) -> bool:
    return s.startswith(("(", "[")) and s.endswith((")", "]")) and "," in s


def _is_prose(s: str) -> bool:
    """Words beyond LaTeX commands and connectives: math-verify would grade a single number out of it."""
    bare = _COMMAND_NAME.sub(" ", _ENVIRONMENT.sub(" ", s))
    return (any(w.lower() not in _NOT_PROSE for w in _PROSE_WORD.findall(bare))
            or any(w.lower() in _SHORT_WORDS for w in _SHORT_WORD.findall(bare)))


def _opaque_set_builder(s: str) -> bool:
    """A set builder whose condition is not one inequality chain (``\\{x|x=3k,k\\in Z\\}``)."""
    builder = _SET_BUILDER.fullmatch(s)
    return builder is not None and (not _INEQUALITY.search(builder.group(2)) or "," in builder.group(2))


def _symbolic_form(s: str, number: _Num | None) -> str:
    """What math-verify gets: numbers in canonical form, set builders as their condition, one line."""
    if number is not None and not number.percent:
        return number.text
    builder = _SET_BUILDER.fullmatch(s)
    return " ".join((builder.group(2) if builder else s).split())  # its LaTeX patterns stop at newlines


# --------------------------------------------------------------------------- verdicts


@dataclass(frozen=True)
class GradeResult:
    """A verdict and how it was reached: method is the step that decided it (see the module doc)."""

    prediction: str | None
    correct: bool
    method: str  # none | numeric | string | choice | text | guard | symbolic
    timed_out: bool = False
    error: str | None = None


_lock = threading.Lock()
_cache: OrderedDict[tuple[str, str], GradeResult] = OrderedDict()
_stats: Counter = Counter()


def configure(timeout: float | None = None, cache_size: int | None = None) -> None:
    """Set the per-item symbolic timeout (seconds) and the verdict cache size; clears the cache."""
    with _lock:
        if timeout is not None:
            if timeout <= 0:
                raise ValueError("timeout must be positive")
            _settings["timeout"] = float(timeout)
        if cache_size is not None:
            _settings["cache_size"] = int(cache_size)
        _cache.clear()


def stats() -> dict[str, int]:
    """Counts since start: calls, cache_hits, verdicts per method, timeouts, errors, worker_starts."""
    with _lock:
        return dict(_stats)


def reset_stats() -> None:
    with _lock:
        _stats.clear()


def clear_cache() -> None:
    with _lock:
        _cache.clear()


def _count(*keys: str) -> None:
    with _lock:
        for key in keys:
            _stats[key] += 1


def _decide(prediction: str, gold: str) -> GradeResult:
    if len(prediction) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:  # not an answer; keeps regexes cheap
        return GradeResult(prediction, prediction.strip() == gold.strip(), "guard")
    plain_p, plain_g = _PLAIN.fullmatch(prediction.strip()), _PLAIN.fullmatch(gold.strip())
    if plain_p and plain_g:  # the bulk of branch verdicts: skip the regex-heavy cleaning
        return GradeResult(prediction, _numbers_match(_plain_number(plain_p[0]), _plain_number(plain_g[0])), "numeric")
    (p_name, p), (g_name, g) = _split_assignment(_clean(prediction)), _split_assignment(_clean(gold))
    if not p or not g:
        return GradeResult(prediction, False, "none")
    if p_name and g_name and p_name != g_name:  # "x = 2" is not "y = 2" (a vertical vs a horizontal line)
        return GradeResult(prediction, False, "guard")
    pn, gn = _number(p), _number(g)
    if pn is not None and gn is not None:
        return GradeResult(prediction, _numbers_match(pn, gn), "numeric")
    if normalize(p) == normalize(g):
        return GradeResult(prediction, True, "string")
    choice = _CHOICE_GOLD.fullmatch(g)
    if choice:
        return GradeResult(prediction, _choice_letter(p) == choice.group(1), "choice")
    p_time, g_time = _TIME.fullmatch(p), _TIME.fullmatch(g)
    if p_time or g_time:  # "5:45" is a time, not the ratio 1:9 that math-verify would accept
        return GradeResult(prediction, bool(p_time and g_time) and _same_time(p_time, g_time), "text")
    p_words, g_words = _is_words(p), _is_words(g)
    if p_words and g_words:
        same = " ".join(p.lower().split()) == " ".join(g.lower().split())
        return GradeResult(prediction, same, "text")
    if (p_words and gn is not None) or (g_words and pn is not None):
        return GradeResult(prediction, False, "text")
    if (
        (pn is None and _DIGIT_RUN.fullmatch(p))
        or (gn is None and _DIGIT_RUN.fullmatch(g))
        or (_is_roster_set(p) and _is_tuple_or_interval(g))
        or "@" in p
        or "@" in g
        or _opaque_set_builder(p)
        or _opaque_set_builder(g)
        or _PIECEWISE.search(p)
        or _PIECEWISE.search(g)
        or _is_prose(p)
        or _is_prose(g)
        or len(p) > MAX_SYMBOLIC_CHARS
        or len(g) > MAX_SYMBOLIC_CHARS
    ):
        return GradeResult(prediction, False, "guard")
    return _WORKER.compare(prediction, _symbolic_form(p, pn), _symbolic_form(g, gn), _settings["timeout"])


def check(prediction: str | None, gold: str | None) -> GradeResult:
    """The full verdict for an already extracted prediction.

    Cached, timeouts and errors included: a pair that stalls the worker costs its timeout once per run.
    """
    if prediction is None or gold is None:
        return GradeResult(prediction, False, "none")
    prediction, gold = str(prediction), str(gold)
    key = (prediction, gold)
    with _lock:
        _stats["calls"] += 1
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            _stats["cache_hits"] += 1
            return hit
    try:
        result = _decide(prediction, gold)
    except Exception as exc:  # noqa: BLE001 - a crash marks this item only, never the run
        result = GradeResult(prediction, False, "none", error=f"{type(exc).__name__}: {exc}"[:300])
    with _lock:
        _stats[result.method] += 1
        _stats["timeouts"] += result.timed_out
        _stats["errors"] += result.error is not None
        if len(prediction) + len(gold) <= 20_000 and _settings["cache_size"] > 0:
            _cache[key] = result
            while len(_cache) > _settings["cache_size"]:
                _cache.popitem(last=False)
    return result


def is_equivalent(prediction: str | None, gold: str | None) -> bool:
    """Whether a prediction states the gold answer (see the module doc for the order of checks)."""
    return check(prediction, gold).correct


def grade_detailed(text: str, gold: str) -> GradeResult:
    """Extract then compare, keeping how the verdict was reached and any timeout or error.

    Never raises: whatever breaks while grading one item is reported in ``error`` for that item.
    """
    try:
        prediction = extract_answer(text)
    except Exception as exc:  # noqa: BLE001
        return GradeResult(None, False, "none", error=f"{type(exc).__name__}: {exc}"[:300])
    return check(prediction, gold)


def grade(text: str, gold: str) -> tuple[str | None, bool]:
    """Extract then compare: ``(prediction, correct)``."""
    result = grade_detailed(text, gold)
    return result.prediction, result.correct


# --------------------------------------------------------------------------- symbolic worker


class _SoftTimeout(BaseException):
    """Raised by the worker's own alarm; BaseException so math-verify's ``except Exception`` lets it through."""


def _parse(answer: str) -> list:
    """math-verify's parse, minus its habit of grading a stray number when the LaTeX does not parse.

    With both extractors on, a failed LaTeX parse lets the plain-expression extractor pick any number
    out of the text (``"d=3\\sqrt{5}, M=(...)"`` became 3). The plain extractor is used only when what
    it matched is the whole answer (``sqrt(2)/2``).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse
    from sympy import Basic, MatrixBase

    latex = parse(f"${answer}$", extraction_config=[LatexExtractionConfig()], parsing_timeout=None)
    if any(isinstance(x, Basic | MatrixBase) for x in latex):
        return latex
    expr = parse(answer, extraction_config=[ExprExtractionConfig()], parsing_timeout=None)
    if len(expr) == 2 and "".join(str(expr[1]).split()) == "".join(answer.split()):
        return expr
    return latex


def _symbolic_equal(pred: str, gold: str) -> bool:
    from math_verify import verify

    g, p = _parse(gold), _parse(pred)
    return bool(g) and bool(p) and bool(verify(g, p, timeout_seconds=None))


def _serve(fd: int, memory_limit: int) -> None:
    """Worker loop on socket ``fd``: answer ``(pred, gold, seconds)`` with ``(status, verdict)`` until EOF."""
    import signal
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if hard == resource.RLIM_INFINITY or hard > memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, hard))
    except (ImportError, ValueError, OSError):
        pass
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)
    try:
        import math_verify  # noqa: F401 - imported once here, before the first item is timed
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which marks items as errors
        conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return

    def on_alarm(signum, frame):
        raise _SoftTimeout

    signal.signal(signal.SIGALRM, on_alarm)
    conn.send(("ready", None))
    while True:
        try:
            pred, gold, seconds = conn.recv()
        except (EOFError, OSError):
            return
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            reply = ("ok", _symbolic_equal(pred, gold))
        except _SoftTimeout:
            reply = ("timeout", None)
        except BaseException as exc:  # noqa: BLE001 - RecursionError, MemoryError, ... mark only this item
            reply = ("error", f"{type(exc).__name__}: {str(exc)[:200]}")
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        conn.send(reply)


class _Worker:
    """One math-verify process, restarted after a hard timeout or a crash; calls are serialised.

    A plain subprocess (``python -c``), not multiprocessing: spawn and forkserver re-import the parent's
    ``__main__``, which re-runs any script that grades at top level without a ``__main__`` guard.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._conn = None
        self._owner = None  # pid that started the worker: a forked child must not share its socket
        self._ready = False
        self._failed_starts = 0
        self._fatal: str | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        code = (f"import sys; sys.path[:0] = {[p for p in sys.path if p]!r}; "
                f"from cft.verify import _serve; _serve({theirs.fileno()}, {WORKER_MEMORY_LIMIT})")
        try:
            self._proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),),
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          start_new_session=True)  # Ctrl-C is the parent's to handle
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._conn, self._owner, self._ready = Connection(ours.detach()), os.getpid(), False
        _count("worker_starts")

    def _stop(self) -> None:
        if self._proc is not None and self._owner == os.getpid():
            self._proc.kill()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                log.warning("verifier worker %d did not exit after SIGKILL", self._proc.pid)
            self._conn.close()
        self._proc = self._conn = None
        self._ready = False

    def _ensure_ready(self) -> None:
        if self._proc is not None and (self._owner != os.getpid() or self._proc.poll() is not None):
            self._stop()
        if self._proc is None:
            self._start()
        if not self._ready:
            try:
                if not self._conn.poll(STARTUP_TIMEOUT):
                    raise RuntimeError(f"no sign of life within {STARTUP_TIMEOUT:.0f}s")
                status, message = self._conn.recv()
            except (EOFError, OSError, RuntimeError) as exc:
                status, message = "died", f"{type(exc).__name__}: {exc} (its traceback, if any, is on stderr)"
            if status != "ready":
                self._stop()
                self._failed_starts += 1
                if status == "fatal" or self._failed_starts >= 3:  # do not pay a failed start per item
                    self._fatal = f"verifier worker cannot start: {message}"
                raise RuntimeError(f"verifier worker failed to start: {message}")
            self._ready, self._failed_starts = True, 0

    def compare(self, prediction: str, pred: str, gold: str, timeout: float) -> GradeResult:
        with self._lock:
            if self._fatal:
                return GradeResult(prediction, False, "symbolic", error=self._fatal)
            try:
                self._ensure_ready()
                self._conn.send((pred, gold, timeout))
                if not self._conn.poll(timeout + TIMEOUT_GRACE):
                    log.warning("verifier: no answer within %.1fs, worker killed (pred=%.80r, gold=%.80r)",
                                timeout + TIMEOUT_GRACE, pred, gold)
                    self._restart()
                    return GradeResult(prediction, False, "symbolic", timed_out=True)
                status, verdict = self._conn.recv()
            except Exception as exc:  # noqa: BLE001 - a verdict must come back whatever broke
                log.warning("verifier worker failed on pred=%.80r gold=%.80r: %r", pred, gold, exc)
                self._restart()
                return GradeResult(prediction, False, "symbolic", error=f"{type(exc).__name__}: {exc}"[:300])
        if status == "ok":
            return GradeResult(prediction, bool(verdict), "symbolic")
        if status == "timeout":
            return GradeResult(prediction, False, "symbolic", timed_out=True)
        return GradeResult(prediction, False, "symbolic", error=verdict)

    def _restart(self) -> None:
        """Kill the worker and start the next one now, so its imports overlap the caller's work."""
        self._stop()
        if not self._fatal:
            try:
                self._start()
            except Exception as exc:  # noqa: BLE001 - the next item retries the start and reports it
                log.warning("verifier worker could not be restarted: %s", exc)

    def warm_up(self) -> None:
        with self._lock:
            if self._proc is None and not self._fatal:
                self._start()

    def close(self) -> None:
        with self._lock:
            self._stop()


_WORKER = _Worker()
atexit.register(_WORKER.close)


def warm_up() -> None:
    """Start the symbolic worker in the background now, so the first hard case does not wait for it."""
    _WORKER.warm_up()


def shutdown() -> None:
    """Stop the symbolic worker (it also exits by itself when this process ends)."""
    _WORKER.close()
