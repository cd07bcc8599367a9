"""The audit of the opt-in answer stop: what stopping at the first complete answer changed.

Stopped responses (stage A, stage D) and stopped branches (stage B) are decoded on to their next answer
and, where the verdict flips there or for a seeded sample, to EOS or the cap (``decode_on``); the summary
counts the verdicts that changed.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from cft import verify
from cft.artifacts import read_meta
from cft.decoding.api import DecodeConfig, decode_on


@dataclass
class Stop:
    """A response (or branch) the answer stop ended before EOS and the cap, with the verdict it got there."""

    prompt_ids: list[int]
    response_ids: list[int]  # the graded response so far, ending where the stop rule ended it
    cap: int  # tokens it could still have decoded (> 0)
    gold: str
    ok: bool | None  # its verdict at the stop


LISTED = 100  # the most changed items a stop audit lists (its counts cover them all)


def audit_stops(model, tok, stops: list[Stop], grade, sample: int, seed: int, cfg: DecodeConfig) -> tuple[dict, dict]:
    """What the answer stop changed: the verdicts of stopped responses decoded on to EOS or the cap.

    Every stop is decoded on to its next complete answer (or EOS/cap); one that reached EOS or the cap has
    the default rule's verdict already, and one whose verdict flipped at that next answer is decoded on to
    EOS/cap, as is a seeded sample of ``sample`` stops. ``grade(response_ids, gold)`` is the caller's verdict
    (``ok``: bool or None). Returns the summary and ``{stop index: verdict decoded to EOS/cap}`` of every stop
    whose full verdict is known.
    """
    ahead = decode_on(model, tok, [(s.prompt_ids + s.response_ids, s.cap) for s in stops], True, cfg)
    full: dict[int, bool | None] = {}
    flips = []
    for i, (s, out) in enumerate(zip(stops, ahead)):
        ok = grade(s.response_ids + out.ids, s.gold)
        if ok != s.ok:
            flips.append(i)
        if out.finish != "answer" or len(out.ids) >= s.cap:
            full[i] = ok
    sampled = random.Random(seed).sample(range(len(stops)), min(sample, len(stops)))
    rest = sorted((set(sampled) | set(flips)) - set(full))
    tail = decode_on(model, tok, [(stops[i].prompt_ids + stops[i].response_ids + ahead[i].ids,
                                   stops[i].cap - len(ahead[i].ids)) for i in rest], False, cfg)
    for i, out in zip(rest, tail):
        full[i] = grade(stops[i].response_ids + ahead[i].ids + out.ids, stops[i].gold)
    changed = sorted(i for i, ok in full.items() if ok != stops[i].ok)
    summary = {"stopped": len(stops), "sample": len(sampled), "flipped_at_next_answer": len(flips),
               "checked": len(full), "verdicts_changed": len(changed),
               "decoded_tokens": sum(len(o.ids) for o in ahead) + sum(len(o.ids) for o in tail)}
    return summary, full


def stage_a_audit(model, tok, records: list[dict], cfg: DecodeConfig) -> dict:
    """``audit_stops`` over the responses the answer stop ended: how many `correct` verdicts it changed."""
    stopped = [r for r in records if r["finish"] == "answer" and len(r["response_ids"]) < cfg.max_new_tokens]
    stops = [Stop(r["prompt_ids"], r["response_ids"], cfg.max_new_tokens - len(r["response_ids"]), r["gold"],
                  r["correct"]) for r in stopped]

    def grade(ids: list[int], gold: str) -> bool:
        return verify.grade_detailed(tok.decode(ids, skip_special_tokens=True), gold).correct

    summary, full = audit_stops(model, tok, stops, grade, cfg.stop_audit, cfg.seed, cfg)
    summary["changed"] = [{"id": stopped[i]["id"], "correct_at_stop": stops[i].ok, "correct_at_end": ok}
                          for i, ok in sorted(full.items()) if ok != stops[i].ok][:LISTED]
    return summary


def earlier_audit(out, config: dict) -> dict | None:
    """The stop audit a finished earlier run with this config recorded in ``out``'s metadata (None: none), for
    a rerun that decoded nothing new (``cft eval`` reuses a finished run's samples): it audits the same records,
    so it is not decoded again."""
    meta = read_meta(out)
    return meta.get("stop_audit") if meta.get("config") == json.loads(json.dumps(config, default=str)) else None


def print_stop_audit(audit: dict | None, what: str) -> None:
    """One line on what the answer stop changed (nothing without the stop), and a warning when it changed any."""
    if not audit:
        return
    print(f"answer stop audit: {audit['stopped']} {what} stopped at their first answer; {audit['checked']} decoded "
          f"on to EOS or the cap ({audit['flipped_at_next_answer']} flipped at their next answer, a sample of "
          f"{audit['sample']}): {audit['verdicts_changed']} verdicts changed")
    if audit["verdicts_changed"]:
        print(f"WARNING: the answer stop changed {audit['verdicts_changed']} verdicts of the {audit['checked']} "
              "checked; the default (no --stop-at-answer) grades what cft eval grades")
