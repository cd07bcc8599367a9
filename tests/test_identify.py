"""Stage B: the critical rule on a hand-built model, and exactness of the fast engine."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from cft.artifacts import load_records, read_meta
from cft.generate import DecodeConfig, decode
from cft.identify import IdentifyConfig, identify, merge_shards, token_kind
from cft.prompts import render_ids
from tests.conftest import generation, write_jsonl

# Next-token table of a bigram model: token -> its rank-1, rank-2, rank-3 successors.  Greedy from the
# prompt's last token ("\n") it writes " The answer is 7." and stops.
EOS = "<|im_end|>"
BIGRAM = {
    "\n": [" The", " Now", EOS],  # " Now" -> " answer is 7." still right: " The" is replaceable
    " Now": [" answer", EOS, "."],
    " The": [" answer", " has", "."],  # " has" and "." end without an answer: " answer" is critical
    " has": [EOS, ".", " is"],
    " answer": [" is", " gives", "."],  # "answer gives 7." still ends in 7: " is" is replaceable
    " gives": [" ", EOS, "."],
    " is": [" ", "\n", "."],  # "\n" restarts " The answer is 7.": " " is replaceable
    " ": ["7", "8", "9"],  # 8 and 9 are wrong answers: "7" is critical
    "7": [".", "0", "1"],  # 70 and 71 are wrong: "." is critical
    "8": [".", EOS, "0"],
    "9": [".", EOS, "0"],
    "0": [".", EOS, "1"],
    "1": [".", EOS, "0"],
    ".": [EOS, " ", "\n"],
}
EXPECTED_TOKENS = [" The", " answer", " is", " ", "7", ".", EOS]
EXPECTED_CRITICAL = [0, 1, 0, 0, 1, 1, 0]  # the final EOS is not tested


def bigram_model(tok) -> LlamaForCausalLM:
    """A Llama whose attention and MLP outputs are zero: the logits depend on the current token only."""
    vocab = len(tok)
    hidden = vocab + (-vocab % 8)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.model.norm.weight.fill_(1.0)
        model.model.layers[0].input_layernorm.weight.fill_(1.0)
        model.model.layers[0].post_attention_layernorm.weight.fill_(1.0)
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        head = model.lm_head.weight  # (vocab, hidden); RMSNorm turns one-hot e_i into sqrt(hidden) * e_i
        for src, nexts in BIGRAM.items():
            i = tok.convert_tokens_to_ids(_tok(tok, src))
            for score, nxt in zip((10.0, 9.0, 8.0), nexts):
                head[tok.convert_tokens_to_ids(_tok(tok, nxt)), i] = score / math.sqrt(hidden)
    return model


def _tok(tok, text: str) -> str:
    """The vocabulary entry for a piece of text that the tokenizer keeps as one token."""
    ids = tok(text, add_special_tokens=False).input_ids
    assert len(ids) == 1, f"{text!r} is not a single token"
    return tok.convert_ids_to_tokens(ids[0])


@pytest.fixture(scope="module")
def bigram(testbed_tokenizer):
    return bigram_model(testbed_tokenizer), testbed_tokenizer


def labels_for(tmp_path, model, tok, records, engine, **kw):
    tmp_path.mkdir(parents=True, exist_ok=True)
    gen = write_jsonl(tmp_path / f"gen-{engine}.jsonl", records)
    out = tmp_path / f"labels-{engine}.jsonl"
    cfg = IdentifyConfig(model="hand-built", input=str(gen), out=str(out), engine=engine, max_new_tokens=32, **kw)
    summary = identify(cfg, model=model, tok=tok)
    return load_records(out, "labels"), summary


def test_bigram_model_decodes_the_designed_response(bigram):
    model, tok = bigram
    out = decode(model, tok, [render_ids(tok, "q")], DecodeConfig(max_new_tokens=20))[0][0]
    assert [tok.decode([i]) for i in out.ids] == EXPECTED_TOKENS
    assert out.text == " The answer is 7."


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_critical_rule_on_hand_built_model(tmp_path, bigram, engine):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    labels, summary = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], engine)
    (rec,) = labels
    assert rec["critical"] == EXPECTED_CRITICAL
    assert rec["eligible"] == [1, 1, 1, 1, 1, 1, 0]
    assert rec["greedy"] is True
    # the alternatives are the rank-2 and rank-3 successors, in rank order
    assert [b["token"] for b in rec["branches"][1]] == [tok.convert_tokens_to_ids(_tok(tok, t)) for t in (" has", ".")]
    # "7" -> "8" continues greedily "8." and answers 8
    eight = rec["branches"][4][0]
    assert eight["answer"] == "8" and eight["ok"] is False
    assert tok.decode(eight["ids"]) == ".<|im_end|>"
    text = rec["response"]
    assert [text[s:e] for s, e in rec["critical_spans"]] == [" answer", "7", "."]
    assert summary["critical_fraction"] == pytest.approx(3 / 6)


def test_fast_engine_skips_rank3_after_success_reference_runs_all(tmp_path, bigram):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    fast, _ = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], "fast")
    ref, _ = labels_for(tmp_path, model, tok, [generation(tok, "q", response, "7")], "reference")
    # position 0: rank-2 " Now" succeeds, so the fast engine never runs rank 3
    assert fast[0]["branches"][0][0]["ok"] is True and fast[0]["branches"][0][1]["ok"] is None
    assert ref[0]["branches"][0][1]["ok"] is not None


def test_non_greedy_response_is_reported_and_uses_top_k_minus_y(tmp_path, bigram):
    model, tok = bigram
    ids = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in [" The", " answer", " gives", " ", "7", ".", EOS]]
    (rec,), summary = labels_for(tmp_path, model, tok, [generation(tok, "q", ids, "7")], "fast")
    assert rec["greedy"] is False and rec["greedy_mismatches"] == [2]
    # at the mismatch y_t = " gives" (rank 2), so the alternatives are ranks 1 and 3: " is" and "."
    assert [b["token"] for b in rec["branches"][2]] == [tok.convert_tokens_to_ids(_tok(tok, t)) for t in (" is", ".")]
    assert summary["not_greedy"] == 1


def _fake_correct(tok, model_dir, tmp_path, n=6, max_new_tokens=30):
    """Responses of a random model, each made 'correct' by taking its own answer as gold."""
    from cft.models import load_model
    from cft.testbed.problems import generate_split
    from cft.verify import extract_answer

    model, tok = load_model(str(model_dir))
    problems = generate_split("train", n)
    prompts = [render_ids(tok, p.question) for p in problems]
    outs = decode(model, tok, prompts, DecodeConfig(max_new_tokens=max_new_tokens))
    records = [generation(tok, p.question, o[0].ids, extract_answer(o[0].text) or "none", rid=f"r{i}")
               for i, (p, o) in enumerate(zip(problems, outs))]
    return model, tok, records


def test_fast_engine_equals_reference_token_for_token(tmp_path, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path)
    ref, _ = labels_for(tmp_path, model, tok, records, "reference")
    fast, _ = labels_for(tmp_path, model, tok, records, "fast", batch_size=7)  # small batch: many refills
    assert [r["critical"] for r in ref] == [r["critical"] for r in fast]
    compared = 0
    for r, f in zip(ref, fast):
        for br, bf in zip(r["branches"], f["branches"]):
            for a, b in zip(br, bf):
                if b["ok"] is not None:
                    assert (a["ids"], a["ok"], a["answer"]) == (b["ids"], b["ok"], b["answer"])
                    compared += 1
    assert compared > 100


def test_shards_merge_to_single_process_labels(tmp_path, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=5, max_new_tokens=12)
    gen = write_jsonl(tmp_path / "gen.jsonl", records)
    single = tmp_path / "single.jsonl"
    identify(IdentifyConfig(model=str(random_model_dir), input=str(gen), out=str(single), max_new_tokens=12),
             model=model, tok=tok)
    sharded = tmp_path / "sharded.jsonl"
    for i in range(2):
        identify(IdentifyConfig(model=str(random_model_dir), input=str(gen), out=str(sharded), max_new_tokens=12,
                                num_shards=2, shard_index=i), model=model, tok=tok)
    merge_shards(str(sharded), 2)
    # branch margins are float diagnostics that depend on which rows share a batch: compared apart
    assert without_margins(load_records(sharded, "labels")) == without_margins(load_records(single, "labels"))
    assert read_meta(sharded)["summary"]["responses"] == len(records)


def test_approximations_are_recorded(tmp_path, bigram):
    model, tok = bigram
    response = [tok.convert_tokens_to_ids(_tok(tok, t)) for t in EXPECTED_TOKENS]
    gen = write_jsonl(tmp_path / "gen.jsonl", [generation(tok, "q", response, "7")])
    out = tmp_path / "approx.jsonl"
    identify(IdentifyConfig(model="hand-built", input=str(gen), out=str(out), skip_confident=0.0), model=model, tok=tok)
    (rec,) = load_records(out, "labels")
    assert rec["eligible"] == [0] * 7 and rec["critical"] == [0] * 7
    assert read_meta(out)["config"]["approximations"] == ["skip_confident"]


def without_margins(labels: list[dict]) -> list[dict]:
    """Labels records with the branch margins taken out (floats that vary with batch composition)."""
    return [{**r, "branches": [[{k: v for k, v in b.items() if k != "margin"} for b in br] for br in r["branches"]]}
            for r in labels]


def test_token_kind():
    assert [token_kind(t) for t in ["7", " 12", " +", " =", "*", " apples", ".", " "]] == [
        "digit", "digit", "operator", "operator", "operator", "other", "other", "other"]


def test_fast_engine_out_of_memory_halves_the_batch_same_labels(tmp_path, random_model_dir, testbed_tokenizer):
    model, tok, records = _fake_correct(testbed_tokenizer, random_model_dir, tmp_path, n=3, max_new_tokens=16)
    want, _ = labels_for(tmp_path, model, tok, records, "fast", batch_size=16)
    forward = model.forward
    failures = []

    @functools.wraps(forward)  # keeps forward's signature, so the engine passes the cache the same way
    def small_memory(*args, **kwargs):
        if kwargs["input_ids"].shape[0] > 5:
            failures.append(kwargs["input_ids"].shape[0])
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    model.forward = small_memory
    try:
        got, _ = labels_for(tmp_path / "oom", model, tok, records, "fast", batch_size=16)
    finally:
        model.forward = forward
    assert failures == [16, 8]  # halved twice, then the batch of 4 fits
    assert [r["critical"] for r in got] == [r["critical"] for r in want]
    assert without_margins(got) == without_margins(want)
