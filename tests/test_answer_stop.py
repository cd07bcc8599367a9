"""One answer per response in stages A, B and D: the last one of the response decoded to EOS or the cap.

A scripted model writes a first answer and then a second, different one ("#### 6" then "The answer is 7."
after a branch). The default labels and verdicts follow the second (what ``cft eval`` grades); the opt-in
answer stop follows the first, and its run reports what that changed.
"""

from __future__ import annotations

import importlib.util
import json
from argparse import Namespace

import pytest
import torch
from transformers import LlamaForCausalLM

from cft.artifacts import InputError, load_records, read_meta
from cft.decoding.api import DecodeConfig
from cft.generate import GenerateConfig, generate
from cft.identify import IdentifyConfig, identify, print_summary
from cft.prompts import render_ids
from cft.testbed.pretrain import PretrainConfig, build_model
from tests.conftest import REPO

QUESTION = "What is 3 + 4?"
SCRIPT = " #### 5\nThe answer is 7."  # the first answer (5) is wrong, the last (7) right
GOLD = "7"


class Scripted(LlamaForCausalLM):
    """Greedy follows ``table[(position, token)]`` (EOS where it has no entry); ``second`` at a (position, token)
    is the rank-2 token there, every other token ties far below. Keyed by position too, so a token that repeats
    in the script ("#", " ") can have another successor each time; any decoder that passes positions (or a
    cache position) follows it, wherever it puts the row in its batch."""

    table: dict[tuple[int, int], int] = {}
    second: dict[tuple[int, int], int] = {}
    eos: int = 0
    filler: int = 0

    def forward(self, *args, input_ids=None, position_ids=None, cache_position=None, **kwargs):
        out = super().forward(*args, input_ids=input_ids, position_ids=position_ids, cache_position=cache_position,
                              **kwargs)
        width = out.logits.shape[1]
        if position_ids is None:
            start = 0 if cache_position is None else int(cache_position[0])
            position_ids = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)[None]
        position_ids = position_ids.expand(input_ids.shape[0], -1)
        logits = torch.full_like(out.logits, -1e4)
        for row in range(input_ids.shape[0]):
            for col in range(width):
                c = input_ids.shape[1] - width + col
                key = (int(position_ids[row, c]), int(input_ids[row, c]))
                first = self.table.get(key, self.eos)
                logits[row, col, first] = 0.0
                second = self.second.get(key, self.filler)
                logits[row, col, second if second != first else self.eos] = -1.0
        out.logits = logits
        return out


@pytest.fixture(scope="module")
def scripted(testbed_tokenizer):
    tok = testbed_tokenizer
    model = Scripted(build_model(tok, PretrainConfig(hidden_size=16, layers=1, heads=2, intermediate_size=32)).config)
    prompt = render_ids(tok, QUESTION)
    script = tok(SCRIPT, add_special_tokens=False).input_ids + [tok.convert_tokens_to_ids("<|im_end|>")]
    five = tok("5", add_special_tokens=False).input_ids
    six = tok("6", add_special_tokens=False).input_ids
    assert len(five) == len(six) == 1
    at = script.index(five[0])  # the response position of the first answer's digit
    full = prompt + script
    model.table = {(p, full[p]): full[p + 1] for p in range(len(prompt) - 1, len(full) - 1)}
    # at the digit the rank-2 token is "6", which goes on like "5": "#### 6\nThe answer is 7."
    model.second = {(len(prompt) + at - 1, full[len(prompt) + at - 1]): six[0]}
    model.table[(len(prompt) + at, six[0])] = full[len(prompt) + at + 1]
    model.eos = tok.convert_tokens_to_ids("<|im_end|>")
    model.filler = tok.convert_tokens_to_ids("<|im_start|>")  # rank 2 elsewhere: special, then EOS
    return model.eval(), tok, script, at


def _stage_a(tmp_path, model, tok, stop_at_answer: bool, backend: str = "engine"):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "q0", "question": QUESTION, "answer": GOLD}) + "\n")
    gen = tmp_path / f"gen-{int(stop_at_answer)}.jsonl"
    summary = generate(GenerateConfig(model="scripted", data=str(data), out=str(gen),
                                      decode=DecodeConfig(max_new_tokens=40, stop_at_answer=stop_at_answer,
                                                          backend=backend)),
                       model=model, tok=tok)
    return gen, summary


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_default_labels_follow_the_last_answer_and_the_opt_in_stop_reports_its_change(tmp_path, scripted, engine,
                                                                                     capsys):
    model, tok, script, at = scripted
    gen, summary = _stage_a(tmp_path, model, tok, stop_at_answer=False)
    (rec,) = load_records(gen, "generations")
    # stage A decodes to EOS and grades the last answer, as cft eval does
    assert rec["response_ids"] == script and rec["correct"] is True and rec["prediction"] == "7"
    assert summary["stop_audit"] is None
    assert "EOS or the length cap" in read_meta(gen)["decoding"]["stop_rule"]

    out = tmp_path / f"labels-{engine}.jsonl"
    identify(IdentifyConfig(model="scripted", input=str(gen), out=str(out), engine=engine, k=2), model=model, tok=tok)
    (lab,) = load_records(out, "labels")
    branch = lab["branches"][at][0]
    assert branch["token"] == tok.convert_tokens_to_ids("6")
    # "#### 6\nThe answer is 7.": graded by its last answer, the branch is right and "5" is not critical
    assert branch["ok"] is True and branch["answer"] == "7" and lab["critical"][at] == 0
    meta = read_meta(out)
    assert meta["config"]["stop_at_answer"] is False and meta["summary"]["stop_audit"] is None
    assert "EOS or the length cap" in meta["config"]["protocol"]["branch_end"]

    # opt-in: the branch stops at "#### 6\n", is graded 6, "5" becomes critical, and the run says so
    stopped = tmp_path / f"labels-stop-{engine}.jsonl"
    s = identify(IdentifyConfig(model="scripted", input=str(gen), out=str(stopped), engine=engine, k=2,
                                stop_at_answer=True, stop_audit=0), model=model, tok=tok)
    (lab,) = load_records(stopped, "labels")
    assert lab["branches"][at][0]["answer"] == "6" and lab["critical"][at] == 1
    audit = s["stop_audit"]
    assert audit["flipped_at_next_answer"] == 1 and audit["verdicts_changed"] == 1 and audit["labels_changed"] == 1
    assert audit["changed"] == [{"key": lab["key"], "id": "q0", "position": at, "rank": 2, "ok_at_stop": False,
                                 "answer_at_stop": "6", "ok_at_end": True}]
    assert "first complete answer" in read_meta(stopped)["config"]["protocol"]["branch_end"]
    print_summary(s)
    printed = capsys.readouterr().out
    assert "1 verdicts changed" in printed and "WARNING: the answer stop changed 1 verdicts" in printed
    assert "1 labels changed" in printed


@pytest.mark.parametrize("backend", ["engine", "hf"])
def test_stage_a_answer_stop_is_audited_and_its_generations_need_the_flag(tmp_path, scripted, backend):
    model, tok, script, _ = scripted
    gen, summary = _stage_a(tmp_path, model, tok, stop_at_answer=True, backend=backend)
    (rec,) = load_records(gen, "generations")
    assert rec["finish"] == "answer" and rec["prediction"] == "5" and rec["correct"] is False
    audit = summary["stop_audit"]
    assert (audit["stopped"], audit["checked"], audit["verdicts_changed"]) == (1, 1, 1)
    assert audit["changed"] == [{"id": "q0", "correct_at_stop": False, "correct_at_end": True}]
    # a file made with the answer stop is labelled with that rule only when asked for
    with pytest.raises(InputError, match="made with the answer stop.*--stop-at-answer"):
        identify(IdentifyConfig(model="scripted", input=str(gen), out=str(tmp_path / "L.jsonl")), model=model, tok=tok)
    with pytest.raises(InputError, match=r"stop_at_answer False \(Stage A: True\)"):
        identify(IdentifyConfig(model="scripted", input=str(gen), out=str(tmp_path / "L.jsonl"), stop_at_answer=False),
                 model=model, tok=tok)


def _stop_rule_script():
    spec = importlib.util.spec_from_file_location("stop_rule", REPO / "benchmarks" / "stop_rule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("family,seed", [("qwen2.5", 7)])
def test_default_labels_agree_with_a_plain_decode_to_eos_on_a_zoo_model_the_tests_do_not_build(tmp_path, family,
                                                                                               seed):
    """Default labels vs ``benchmarks/stop_rule.py``'s reference (its own ranking, a plain greedy loop per branch
    to EOS or stage A's cap, ``cft.verify`` on the whole text): equal on every position that is not a near-tie."""
    from cft import zoo
    from cft.models import load_model

    script = _stop_rule_script()
    path = zoo.build(family, tmp_path / "zoo", seed=seed)
    model, tok = load_model(str(path), "float32", "cpu")
    args = Namespace(model=str(path), data="testbed:test", template="chat", problems=2, dtype="float32",
                     device="cpu", max_new_tokens=96, gold="self", responses=2, k=3)
    gen = script.responses(model, tok, args, tmp_path)
    default, summary, _ = script.labels(model, tok, args, gen, tmp_path, False)
    assert summary["stop_audit"] is None and len(default) == 2
    # a seeded sample of positions keeps it CPU-cheap; benchmarks/stop_rule.py checks every position
    check = script.compare_with_reference(model, tok, default, 3, 96, 1e-3, sample=30, seed=seed)
    assert check["changed"] == 0, check["details"]
    assert check["positions"] >= 15  # a near-tie (either side's gap below 1e-3) may go either way


def test_eval_answer_stop_reports_the_greedy_verdicts_it_changed(tmp_path, scripted, monkeypatch):
    from cft import evaluate as ev

    model, tok, _, _ = scripted
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"id": "q0", "question": QUESTION, "answer": GOLD}) + "\n")
    common = {"model": "scripted", "benchmarks": [str(data)], "n_samples": 0, "max_new_tokens": 40, "template": "chat"}
    stopped = ev.evaluate(ev.EvalConfig(out=str(tmp_path / "stop"), stop_at_answer=True, **common), model, tok)
    full = ev.evaluate(ev.EvalConfig(out=str(tmp_path / "full"), **common), model, tok)
    assert stopped[str(data)]["accuracy"] == 0.0 and full[str(data)]["accuracy"] == 1.0
    audit = read_meta(tmp_path / "stop" / ev.SAMPLES)["stop_audit"]
    assert (audit["stopped"], audit["verdicts_changed"]) == (1, 1)
    assert read_meta(tmp_path / "full" / ev.SAMPLES)["stop_audit"] is None
    # a rerun on the finished folder decodes nothing, its audit included (the experiment relies on it)
    import cft.decoding.audit as audit_module

    monkeypatch.setattr(audit_module, "decode_on", lambda *a, **k: pytest.fail("decoded again"))
    monkeypatch.setattr(ev, "decode_outputs",
                        lambda model, tok, groups, progress=None, skip=None: list(groups) and pytest.fail("again"))
    assert ev.evaluate(ev.EvalConfig(out=str(tmp_path / "stop"), stop_at_answer=True, **common), model, tok) == stopped
    assert read_meta(tmp_path / "stop" / ev.SAMPLES)["stop_audit"] == audit
