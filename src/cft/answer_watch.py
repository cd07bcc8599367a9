"""``verify.answer_complete`` of a growing response, in linear time per branch.

Decoders stop a branch once ``verify.answer_complete(decode(response))`` holds, checked after every
trigger token ('.', '}', newline). Decoding and scanning the whole response at every trigger costs
O(T) each, O(T^2) a branch. ``AnswerWatch`` gives the same verdicts from incremental state: it decodes
only the tokens appended since the last check and advances one scanner per rule of ``answer_complete``
over the new characters only (``AnswerText``), with ``verify.extract``'s own patterns;
tests/test_answer_watch.py compares every verdict with ``answer_complete`` on each prefix of many texts
and responses, so the two cannot drift apart unnoticed.

Decoding piecewise is exact for byte-level tokenizers without clean-up (GPT-2 style: SmolLM2, Qwen,
Llama 3, the testbed): the text of a token list is the lossy UTF-8 decoding of its concatenated bytes,
so once a prefix's text does not end in U+FFFD (the mark of a character cut short) the rest decodes on
its own. Tokens that may end inside a character are held back, and a check while some are held back
uses ``answer_complete`` on the whole text (rare in real text). Other tokenizers get no watch
(``Protocol`` then decodes the whole response, as before).
"""

from __future__ import annotations

import re

from cft import verify
from cft.verify.extract import ANSWER_IS, BOX, PERIOD_SPACE, stated_answer

# The patterns of ``verify.answer_complete`` (see its docstring for the rule), shared with it.
_BRACE = re.compile(r"\\[{}]|[{}]")  # an escaped brace is a literal character: matched, then skipped
_CUT = "\ufffd"
_HELD_BACK = 4  # a character is at most 4 bytes, so at most the last 3 tokens can end inside one


class _Box:
    """A ``\\boxed{`` candidate: its brace scan, and where it closes (None: open so far)."""

    __slots__ = ("start", "brace", "pos", "depth", "close", "ok")

    def __init__(self, start: int, brace: int):
        self.start, self.brace, self.pos, self.depth = start, brace, brace, 0
        self.close: int | None = None
        self.ok = False  # whether the content parses (set when it closes)

    def scan(self, text: str, end: int) -> None:
        """Advance the brace count over ``text[pos:end]`` until the candidate closes."""
        if self.close is not None or self.pos >= end:
            return
        for brace in _BRACE.finditer(text, self.pos, end):
            if len(brace.group()) == 2:
                continue
            self.depth += 1 if brace.group() == "{" else -1
            if self.depth == 0:
                self.close = brace.start()
                self.ok = verify.answer_parses(text[self.brace + 1 : self.close])
                return
        # a trailing backslash may escape the next character: scan it again with that character
        self.pos = end - 1 if text[end - 1] == "\\" else end


class AnswerText:
    """``answer_complete`` of a text that only grows (``extend``); ``complete`` costs O(1) amortized.

    One scanner per rule: the last closed ``\\boxed{}`` (recomputed from candidates as they close or
    are superseded), "answer is X." on one line, and the first "#### X" line chain. The last two can
    only turn True, so they latch.
    """

    def __init__(self):
        self.text = ""
        self.latched = False  # an "answer is" or "####" answer was found
        # \boxed{}: candidates not yet known to have a brace; the latest braced one; the verdict of the
        # latest earlier one that closed before the next braced one started (``_last_boxed``'s fallback)
        self.box_scan = 0
        self.unresolved: int | None = None  # end of the latest candidate whose next non-blank is unknown
        self.unresolved_start = 0
        self.last: _Box | None = None
        self.fallback_ok = False
        # "answer is": match ends waiting for a period + whitespace (found) or a newline (dead)
        self.is_scan = 0
        self.waiting: list[int] = []
        self.event_scan = 0
        # "####": the start of the chain's current candidate (-1: none yet) and where its newline search resumes
        self.hash_scan = 0
        self.hash_start = -1
        self.newline_scan = 0

    def extend(self, s: str) -> None:
        if not s:
            return
        self.text += s
        if not self.latched:
            self._boxes()
        if not self.latched:
            self._answer_is()
        if not self.latched:
            self._hashes()

    def complete(self) -> bool:
        if self.latched:
            return True
        if self.last is not None and self.last.close is not None:
            return self.last.ok
        return self.fallback_ok

    # -- \boxed{} ----------------------------------------------------------------------------
    def _boxes(self) -> None:
        text, n = self.text, len(self.text)
        last_end = 0
        for match in BOX.finditer(text, self.box_scan):
            self._resolve()  # the new candidate's backslash ends the previous one's blanks
            self.unresolved, self.unresolved_start = match.end(), match.start()
            last_end = match.end()
        self.box_scan = max(self.box_scan, last_end, n - 5)  # "\boxed" may still start in the last 5
        self._resolve()
        if self.last is not None:
            self.last.scan(text, n)

    def _resolve(self) -> None:
        """Decide the pending candidate once a non-blank character follows it: braced or not."""
        if self.unresolved is None:
            return
        text, i = self.text, self.unresolved
        while i < len(text) and text[i] in " \t":
            i += 1
        if i == len(text):
            self.unresolved = i  # blanks so far: resume after them
            return
        start = self.unresolved_start
        self.unresolved = None
        if text[i] != "{":
            return  # ``\boxed 5`` is not final (bare answers are ignored by the stop rule)
        prev = self.last
        if prev is not None:  # superseded: it counts only if it closed before this candidate started
            prev.scan(text, start)
            if prev.close is not None and prev.close < start:
                self.fallback_ok = prev.ok
        self.last = _Box(start, i)

    # -- "answer is X." ----------------------------------------------------------------------
    def _answer_is(self) -> None:
        text, n = self.text, len(self.text)
        last_end = 0
        for match in ANSWER_IS.finditer(text, self.is_scan):
            if not self.waiting:
                self.event_scan = match.end()
            self.waiting.append(match.end())
            last_end = match.end()
        self.is_scan = max(self.is_scan, last_end, n - 8)
        while self.waiting:  # the next period + whitespace or newline after the earliest waiting match
            period = PERIOD_SPACE.search(text, self.event_scan)
            newline = text.find("\n", self.event_scan)
            at = min(x for x in (period.start() if period else -1, newline, n) if x >= 0)
            if at == n:
                self.event_scan = n - 1 if text.endswith(".") else n
                return
            ready = [e for e in self.waiting if e <= at]
            self.waiting = self.waiting[len(ready) :]
            found = period is not None and period.start() == at  # else a newline ends the line first
            if found and any(verify.answer_parses(stated_answer(text[e:at])) for e in ready):
                self.latched = True
                return
            self.event_scan = at + 1
            if self.waiting and self.waiting[0] > self.event_scan:
                self.event_scan = self.waiting[0]

    # -- "#### X" ----------------------------------------------------------------------------
    def _hashes(self) -> None:
        text, n = self.text, len(self.text)
        while True:
            if self.hash_start < 0:
                start = text.find("####", self.hash_scan)
                if start < 0:
                    self.hash_scan = max(self.hash_scan, n - 3)
                    return
                self.hash_start = self.newline_scan = start
            newline = text.find("\n", self.newline_scan)
            if newline < 0:
                self.newline_scan = n
                return
            if verify.answer_parses(text[self.hash_start + 4 : newline].strip()):
                self.latched = True
                return
            self.hash_scan, self.hash_start = newline, -1


def incremental_decoding(tok) -> bool:
    """Whether piecewise decoding gives ``tok.decode``'s text: a byte-level decoder and no clean-up."""
    from tokenizers import decoders

    backend = getattr(tok, "backend_tokenizer", None)
    return isinstance(getattr(backend, "decoder", None), decoders.ByteLevel) and not getattr(
        tok, "clean_up_tokenization_spaces", False)


class AnswerWatch:
    """``answer_complete(tok.decode(ids, skip_special_tokens=True))`` for one branch whose ids only grow."""

    def __init__(self, tok):
        self.backend = tok.backend_tokenizer  # its decode is ``tok.decode``'s without the Python wrapper (10x)
        self.used = 0  # ids[:used] are decoded into ``text`` (ending on a whole character)
        self.text = AnswerText()

    def _decode(self, ids: list[int]) -> str:
        return self.backend.decode(ids, skip_special_tokens=True)

    def complete(self, ids: list[int]) -> bool:
        """The verdict for the whole of ``ids`` (the same list, longer than at the previous call)."""
        end = len(ids)
        piece = self._decode(ids[self.used : end])
        if not piece.endswith(_CUT):
            self.text.extend(piece)
            self.used = end
            return self.text.complete()
        for cut in range(end - 1, max(self.used, end - _HELD_BACK + 1) - 1, -1):
            head = self._decode(ids[self.used : cut])
            if not head.endswith(_CUT):
                self.text.extend(head)
                self.used = cut
                break
        return verify.answer_complete(self.text.text + self._decode(ids[self.used : end]))
