"""Steps 1-3 of equivalence, in this process: numbers, normalised strings, choices and text, and the guards
for inputs math-verify gets wrong (the list is in the ``cft.verify`` module doc). ``decide`` hands what
is left to a symbolic comparison it is given, so this module holds no state and starts no process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal, localcontext
from fractions import Fraction

MAX_SYMBOLIC_CHARS = 1000  # longer "answers" are compared as strings only
MAX_ANSWER_CHARS = 5000  # longer ones are compared verbatim, without any parsing
REL_TOL = 1e-4

BRACE = re.compile(r"\\[{}]|[{}]")  # a set's \{ and \} are literal characters: matched, then skipped


@dataclass(frozen=True)
class GradeResult:
    """A verdict and how it was reached: method is the step that decided it (see the module doc)."""

    prediction: str | None
    correct: bool
    method: str  # none | numeric | string | choice | text | guard | symbolic
    timed_out: bool = False
    error: str | None = None


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
                if right != "}" or balanced(inner):
                    s = inner.strip()
        if s == before:
            break
    return s


def balanced(s: str) -> bool:
    """Every ``{`` closed in order (a set's ``\\{`` and ``\\}`` do not count)."""
    depth = 0
    for brace in BRACE.finditer(s):
        if len(brace.group()) == 2:
            continue
        depth += 1 if brace.group() == "{" else -1
        if depth < 0:
            return False
    return depth == 0


def clean(s: str) -> str:
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


def split_assignment(s: str) -> tuple[str | None, str]:
    """``"x = 5"`` -> ``("x", "5")``: a single-letter left side names the answer, it is not part of it."""
    m = _ASSIGNMENT.match(s)
    return (m.group(1), s[m.end() :].strip()) if m else (None, s)


def normalize(s: str) -> str:
    """Canonical string form used for exact comparison: cleaned, ``x =`` dropped, all spacing removed."""
    return _SPACING.sub("", split_assignment(clean(s))[1]).replace("{,}", ",").rstrip(".")


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
class Number:
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


def parse_number(s: str) -> Number | None:
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
    return Number(value, approx, percent, _canonical(value, approx))


def _plain_number(s: str) -> Number:
    return Number(Fraction(s), "." in s, False, s)


def _canonical(value: Fraction, approx: bool) -> str:
    """``7/2`` for exact values, the plain decimal (never ``e`` notation) for decimals."""
    if value.denominator == 1 or not approx:
        return str(value)
    with localcontext() as ctx:
        ctx.prec = 60
        return format(Decimal(value.numerator) / Decimal(value.denominator), "f")


def _numbers_match(a: Number, b: Number) -> bool:
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
TIME = re.compile(r"(\d{1,2}):(\d{2})\s*(?:([ap])\.?\s*m\.?)?", re.IGNORECASE)
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


def is_prose(s: str) -> bool:
    """Words beyond LaTeX commands and connectives: math-verify would grade a single number out of it."""
    bare = _COMMAND_NAME.sub(" ", _ENVIRONMENT.sub(" ", s))
    return (any(w.lower() not in _NOT_PROSE for w in _PROSE_WORD.findall(bare))
            or any(w.lower() in _SHORT_WORDS for w in _SHORT_WORD.findall(bare)))


def _opaque_set_builder(s: str) -> bool:
    """A set builder whose condition is not one inequality chain (``\\{x|x=3k,k\\in Z\\}``)."""
    builder = _SET_BUILDER.fullmatch(s)
    return builder is not None and (not _INEQUALITY.search(builder.group(2)) or "," in builder.group(2))


def _symbolic_form(s: str, number: Number | None) -> str:
    """What math-verify gets: numbers in canonical form, set builders as their condition, one line."""
    if number is not None and not number.percent:
        return number.text
    builder = _SET_BUILDER.fullmatch(s)
    return " ".join((builder.group(2) if builder else s).split())  # its LaTeX patterns stop at newlines


# --------------------------------------------------------------------------- the cascade

Symbolic = Callable[[str, str, str], GradeResult]  # (prediction, its symbolic form, the gold's) -> verdict


def decide(prediction: str, gold: str, symbolic: Symbolic) -> GradeResult:
    """The verdict of steps 1-3, else of ``symbolic`` on both answers in the form math-verify gets."""
    if len(prediction) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:  # not an answer; keeps regexes cheap
        return GradeResult(prediction, prediction.strip() == gold.strip(), "guard")
    plain_p, plain_g = _PLAIN.fullmatch(prediction.strip()), _PLAIN.fullmatch(gold.strip())
    if plain_p and plain_g:  # the bulk of branch verdicts: skip the regex-heavy cleaning
        return GradeResult(prediction, _numbers_match(_plain_number(plain_p[0]), _plain_number(plain_g[0])), "numeric")
    (p_name, p), (g_name, g) = split_assignment(clean(prediction)), split_assignment(clean(gold))
    if not p or not g:
        return GradeResult(prediction, False, "none")
    if p_name and g_name and p_name != g_name:  # "x = 2" is not "y = 2" (a vertical vs a horizontal line)
        return GradeResult(prediction, False, "guard")
    pn, gn = parse_number(p), parse_number(g)
    if pn is not None and gn is not None:
        return GradeResult(prediction, _numbers_match(pn, gn), "numeric")
    if normalize(p) == normalize(g):
        return GradeResult(prediction, True, "string")
    choice = _CHOICE_GOLD.fullmatch(g)
    if choice:
        return GradeResult(prediction, _choice_letter(p) == choice.group(1), "choice")
    p_time, g_time = TIME.fullmatch(p), TIME.fullmatch(g)
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
        or is_prose(p)
        or is_prose(g)
        or len(p) > MAX_SYMBOLIC_CHARS
        or len(g) > MAX_SYMBOLIC_CHARS
    ):
        return GradeResult(prediction, False, "guard")
    return symbolic(prediction, _symbolic_form(p, pn), _symbolic_form(g, gn))

