"""Answer extraction and equivalence: the verdicts that decide every critical-token label.

Public API: ``extract_answer(text) -> str | None``, ``is_equivalent(prediction, gold) -> bool``,
``grade(text, gold) -> (prediction, correct)`` and ``grade_detailed`` / ``check`` which also say how a
verdict was reached and whether it timed out or failed. Extraction follows the Qwen2.5-Math toolkit's
order: the last ``\\boxed{}``, else "the answer is", else GSM8K's ``#### N``, else the last number.
``grade_detailed`` of the whole response decoded to EOS or the cap is a response's verdict in every stage
(A's ``correct``, B's branches, D's evaluation). ``answer_complete`` tells a decoder when the first final
answer is complete, for the opt-in ``--stop-at-answer`` speed knob (a later answer can still change it).

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

Modules: ``extract`` (extraction, ``answer_complete``), ``equivalence`` (steps 1-3 and the guards),
``worker`` (step 4's process) and ``grading`` (the cache, counters and the process's one worker).

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

from cft.verify.equivalence import MAX_ANSWER_CHARS, MAX_SYMBOLIC_CHARS, REL_TOL, GradeResult, normalize
from cft.verify.extract import answer_complete, answer_parses, extract_answer, last_boxed
from cft.verify.grading import (
    CACHE_SIZE,
    check,
    clear_cache,
    configure,
    grade,
    grade_detailed,
    is_equivalent,
    reset_stats,
    shutdown,
    stats,
    warm_up,
    worker_pid,
)
from cft.verify.worker import DEFAULT_TIMEOUT, STARTUP_TIMEOUT, TIMEOUT_GRACE, WORKER_MEMORY_LIMIT

__all__ = [
    "CACHE_SIZE", "DEFAULT_TIMEOUT", "MAX_ANSWER_CHARS", "MAX_SYMBOLIC_CHARS", "REL_TOL", "STARTUP_TIMEOUT",
    "TIMEOUT_GRACE", "WORKER_MEMORY_LIMIT", "GradeResult", "answer_complete", "answer_parses", "check",
    "clear_cache", "configure", "extract_answer", "grade", "grade_detailed", "is_equivalent", "last_boxed",
    "normalize", "reset_stats", "shutdown", "stats", "verify_error", "warm_up", "worker_pid",
]


def verify_error(result: GradeResult) -> str:
    """What went wrong while grading, for the record: ``timeout``, the error, or "" (graded normally).

    Never None: in a column that is null throughout the first block ``datasets`` reads (10 MB), a later
    error string cannot be cast, and ``datasets.load_dataset("json", ...)`` fails (docs/FORMATS.md).
    """
    return "timeout" if result.timed_out else (result.error or "")
