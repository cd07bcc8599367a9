"""The decoding layer: everything that turns token ids into continuations, for every stage.

This module holds what every decoder shares: the pinned generation config (a checkpoint's
``generation_config`` sampling settings and penalties never change a greedy decode), the one stop rule
(``StopRule``; ``AnswerStop`` for ``model.generate``), finish reasons, left padding and out-of-memory
detection. The package's modules:

- ``api``: ``DecodeConfig`` and the front end stages A and D call (``decode``, ``decode_outputs``, ``decode_on``);
- ``backends``: the registry of backends by name (``engine``/``fast``, ``hf``, ``reference``);
- ``engine``: the fast engine's two decoders (prompts, counterfactual branches), on ``rowcache`` (the shared
  window cache) and ``drafting`` (re-convergence drafts); ``fast``, ``hf`` and ``reference``: the backends;
- ``audit``: what the opt-in answer stop changed.

Imports no stage: ``cft.generate``, ``cft.identify`` and ``cft.evaluate`` build on it.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, StoppingCriteria

from cft import verify
from cft.answer_watch import AnswerWatch, incremental_decoding
from cft.models import stop_token_ids, vocab_rows

OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory", "not enough memory")  # MPS/XPU, CPU


@dataclass
class Output:
    ids: list[int]
    text: str
    finish: str  # "eos" | "answer" | "length"
    entropy: float | None = None  # mean per-token entropy of the sampling distribution


class StopRule:
    """Where every response and branch ends, in every decoder: at an EOS token, at its length cap, or (the opt-in
    answer stop, ``trigger`` given) once ``verify.answer_complete`` holds after a token whose text can complete an
    answer, checked incrementally (``cft.answer_watch``) where the tokenizer allows. The engine's decoders, stage
    B's protocol and ``model.generate`` (through ``AnswerStop``) all ask this one object."""

    def __init__(self, tok, eos: set[int], trigger: list[bool] | None):
        self.tok, self.eos, self.trigger = tok, eos, trigger
        self.incremental = trigger is not None and incremental_decoding(tok)

    @classmethod
    def of(cls, tok, model, stop_at_answer: bool) -> StopRule:
        """The rule of ``model``'s EOS ids (tokenizer's and generation config's), with the answer stop or not."""
        trigger = trigger_tokens(tok, vocab_rows(model)).tolist() if stop_at_answer else None
        return cls(tok, set(stop_token_ids(tok, model)), trigger)

    @property
    def stop_at_answer(self) -> bool:
        return self.trigger is not None

    def watch(self) -> AnswerWatch | None:
        """Incremental answer detection for one growing response (None: decode the whole text at a trigger)."""
        return AnswerWatch(self.tok) if self.incremental else None

    def answered(self, response: list[int], watch: AnswerWatch | None = None) -> bool:
        """The answer stop alone: ``response`` ends in a trigger token and its text holds a complete answer."""
        if self.trigger is None or not self.trigger[response[-1]]:
            return False
        if watch is not None:
            return watch.complete(response)
        return verify.answer_complete(self.tok.decode(response, skip_special_tokens=True))

    def ended(self, response: list[int], n_new: int, cap: int, watch: AnswerWatch | None = None) -> bool:
        """Whether ``response`` (its last ``n_new`` tokens decoded, at most ``cap`` allowed) ends here.

        ``watch`` (from ``watch``, fed this same growing list) gives the answer stop's verdict without decoding
        the whole response at every trigger token.
        """
        return response[-1] in self.eos or n_new >= cap or self.answered(response, watch)


class AnswerStop(StoppingCriteria):
    """``StopRule``'s answer stop for ``model.generate``: per row, checked on trigger tokens."""

    def __init__(self, rule: StopRule, prompt_len: int, device):
        self.rule, self.prompt_len = rule, prompt_len
        self.trigger = torch.tensor(rule.trigger, dtype=torch.bool, device=device)
        self.lengths: dict[int, int] = {}  # row -> response length when it stopped (later tokens are padding)

    def __call__(self, input_ids, scores, **kwargs):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for row in torch.nonzero(self.trigger[input_ids[:, -1]]).flatten().tolist():
            done[row] = self.rule.answered(input_ids[row, self.prompt_len :].tolist())
            if done[row]:
                self.lengths.setdefault(row, input_ids.shape[1] - self.prompt_len)
        return done


@functools.lru_cache(maxsize=8)
def trigger_tokens(tok, size: int) -> torch.Tensor:
    """Per token id below ``size``: can its text complete an answer ('.', '}', newline)? Only these trigger a check.

    ``size`` is the model's vocabulary (``models.vocab_rows``), which can exceed the tokenizer's
    (Qwen2.5: 151936 rows for 151665 tokens); a sampled id past the tokenizer has no text and is False.
    Cached per tokenizer: a scan of a large vocabulary costs about a second, and every decode call,
    engine and evaluation chunk needs the same flags.
    """
    known = min(len(tok), size)
    texts = tok.batch_decode([[i] for i in range(known)])
    flags = [any(c in text for c in ".}\n") for text in texts] + [False] * (size - known)
    return torch.tensor(flags, dtype=torch.bool)


def pinned_generation_config(eos: list[int], pad: int, max_new_tokens: int,
                             do_sample: bool = False) -> GenerationConfig:
    """The one generation setup of every cft decoder: ours, and neutral in everything else.

    Temperature is not here: sampling applies it in ``hf.Temperature`` (which also records entropy), so
    the config's own stays 1.0. Use it through ``pinned_generate``, which also keeps the checkpoint's
    settings from filling the fields whose neutral value is None.
    """
    return GenerationConfig(
        max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=do_sample, num_beams=1,
        num_return_sequences=1, temperature=1.0, top_k=0 if do_sample else None, top_p=1.0 if do_sample else None,
        typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0,
        no_repeat_ngram_size=0, encoder_no_repeat_ngram_size=0, length_penalty=1.0, bad_words_ids=None,
        eos_token_id=list(eos), pad_token_id=pad, use_cache=True, renormalize_logits=False,
        remove_invalid_values=False, output_scores=False, return_dict_in_generate=False,
    )


@contextlib.contextmanager
def _only(model, gen_config: GenerationConfig):
    """``model.generation_config`` is ``gen_config`` for the duration: generate fills every field a
    config leaves None from the model's (bad_words_ids, suppress_tokens, forced_*_token_id,
    sequence_bias, stop_strings, max_time, watermarking, ...), so only this leaves nothing to inherit.
    """
    saved = model.generation_config
    model.generation_config = gen_config
    try:
        yield
    finally:
        model.generation_config = saved


def pinned_generate(model, gen_config: GenerationConfig, **inputs) -> torch.Tensor:
    """``model.generate(**inputs)`` under ``gen_config`` alone, nothing taken from the checkpoint."""
    with _only(model, gen_config):
        return model.generate(**inputs, generation_config=gen_config)


def finish_reason(ids: list[int], eos: set[int], text: str, stop_at_answer: bool) -> str:
    """Why a response ended: its EOS, a complete answer (when the stop rule was on), or the length cap."""
    if ids and ids[-1] in eos:
        return "eos"
    if stop_at_answer and verify.answer_complete(text):
        return "answer"
    return "length"


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the RuntimeError other backends raise for the same condition."""
    return isinstance(exc, OUT_OF_MEMORY) or (
        isinstance(exc, RuntimeError) and any(m in str(exc) for m in OUT_OF_MEMORY_MESSAGES))


def left_pad(prompts: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids and attention mask of prompts padded on the left to the longest (decoding appends on the right)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    return ids, mask
