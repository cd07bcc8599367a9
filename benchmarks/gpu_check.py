"""GPU check of the fast engine: throughput on Qwen2.5-shaped random-weight models, and exactness on the testbed.

For a Qwen2.5-0.5B-shaped and a Qwen2.5-7B-shaped model (random weights built from the config: no
download), synthetic prompts (random ids) and responses (the model's own greedy continuations): the
fast engine's decoded tokens/s over every branch (k=3, every verdict wrong so both alternatives of
every position run, no answer stop), the bare-forward ceiling (``identify_speed.bare_forward``) at the
engine's batch and mean cache width for one-token and the engine's query width, and plain batched
``model.generate`` at the same batch. Then the reference and fast engines on testbed responses
(``identify_speed.alternate``) with their label agreement.

    benchmarks/gpu_check.sh                  # one H200: bf16, under 8 minutes
    python benchmarks/gpu_check.py --small   # shrunk configs and workload, runs on a CPU in a minute or two
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from identify_speed import alternate, bare_forward, ceiling, collect_responses, compare, sync
from transformers import Qwen2Config, Qwen2ForCausalLM

from cft.decoding import StopRule, engine
from cft.identify import IdentifyConfig, Protocol, prepare
from cft.models import DTYPES, load_model, machine_line
from cft.progress import Progress
from cft.protocol import Verdict

# Shapes of the published configs (hidden, MLP, layers, heads, KV heads, vocabulary, tied embeddings).
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}
SMALL = {
    "qwen2.5-0.5b": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=4096, tie_word_embeddings=False),
}
# Workload per model: responses, prompt length, response length.
WORK = {"qwen2.5-0.5b": (16, 96, 128), "qwen2.5-7b": (8, 96, 96)}
WORK_SMALL = {"qwen2.5-0.5b": (3, 16, 24), "qwen2.5-7b": (2, 16, 24)}


class AllWrong(Protocol):
    """No answer stop, no EOS, every branch graded wrong: the workload is every alternative to full length."""

    def __init__(self, cfg: IdentifyConfig):  # noqa: D107 - no tokenizer: the ids are synthetic
        self.tok, self.cfg, self.rule = None, cfg, StopRule(None, set(), None)
        self.eos = self.rule.eos

    def verdict(self, response, gold):
        return Verdict(False, None, None)


def build(shape: dict, dtype: torch.dtype, device: str) -> Qwen2ForCausalLM:
    """A random-weight model, initialised directly on ``device`` in ``dtype``."""
    cfg = Qwen2Config(**shape, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    model.generation_config.eos_token_id = None
    return model


@torch.inference_mode()
def synthetic(model, n: int, prompt_len: int, response_len: int, seed: int = 0) -> list[dict]:
    """Random prompts and the model's own greedy responses to them."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.config.vocab_size, (n, prompt_len), generator=gen).to(model.device)
    out = model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=response_len,
                         min_new_tokens=response_len, do_sample=False, temperature=None, top_p=None, top_k=None,
                         pad_token_id=0)
    return [{"prompt_ids": p.tolist(), "response_ids": r.tolist(), "gold": "none"}
            for p, r in zip(prompts, out[:, prompt_len:])]


def engine_rate(model, records: list[dict], batch: int, response_len: int) -> tuple[float, engine.EngineStats]:
    """Decoded tokens/s of the fast engine over every branch of ``records`` (teacher-forced passes included)."""
    cfg = IdentifyConfig(model="synthetic", input="-", out="-", k=3, max_new_tokens=response_len,
                         stop_at_answer=False, batch_size=batch)
    proto = AllWrong(cfg)
    works = (prepare(model, None, r, f"s{i}", cfg, proto, True) for i, r in enumerate(records))
    decoder = engine.BranchDecoder(model, SimpleNamespace(pad_token_id=0), cfg, proto)
    sync(model)
    t0 = time.perf_counter()
    with Progress("engine", total=len(records), unit="resp") as progress:
        decoder.run(works, lambda work: progress.advance(1), progress,
                    max(len(r["prompt_ids"]) for r in records))
    sync(model)
    return decoder.stats.tokens / (time.perf_counter() - t0), decoder.stats


def throughput(name: str, args) -> None:
    shape = (SMALL if args.small else SHAPES)[name]
    n, prompt_len, response_len = (WORK_SMALL if args.small else WORK)[name]
    t0 = time.perf_counter()
    model = build(shape, DTYPES[args.dtype], args.device)
    records = synthetic(model, n, prompt_len, response_len)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"{name}: {params:.1f}M parameters, {args.dtype}, {n} responses of {response_len} tokens after "
          f"{prompt_len}-token prompts (built and generated in {time.perf_counter() - t0:.0f}s)", flush=True)
    rate, stats = engine_rate(model, records, args.batch_size, response_len)
    width = round(stats.width_sum / max(stats.forwards, 1))
    q = max(stats.widths, key=stats.widths.get)
    widest = 1 + engine.default_draft(model.device)
    bare = {w: bare_forward(model, args.batch_size, width, w) for w in sorted({1, q, widest})}
    gen_rate, steps = ceiling(model, SimpleNamespace(pad_token_id=0), records, args.batch_size, response_len // 2)
    print(f"  engine   batch={args.batch_size} tok/s={rate:.0f} forwards={stats.forwards} "
          f"tokens_per_forward={stats.tokens_per_forward:.2f} mean_width={width} "
          f"draft={engine.default_draft(model.device)}")
    for w, (fps, tps) in bare.items():
        print(f"  bare     batch={args.batch_size} width={width} q={w} forwards/s={fps:.1f} tok/s={tps:.0f}")
    print(f"  generate batch={args.batch_size} new_tokens={steps} tok/s={gen_rate:.0f}")
    print(f"  {name} engine_tok_s={rate:.0f} forward_ceiling_tok_s={bare[1][1]:.0f} generate_tok_s={gen_rate:.0f} "
          f"vs_bare={rate / bare[1][1]:.2f} vs_bare_bound={max(t for _, t in bare.values()) / bare[1][1]:.2f} "
          f"vs_generate={rate / gen_rate:.2f}", flush=True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def agreement(args) -> None:
    """Reference vs fast engine on testbed responses, alternated as identify_speed does (fp32: the testbed's dtype).

    Each response's own answer is its gold (``--gold self``), so short responses count too.
    """
    model, tok = load_model("testbed", "float32", args.device)
    opts = argparse.Namespace(model="testbed", data="testbed:train", template="chat", problems=60,
                              responses=args.testbed_responses, gold="self", k=3,
                              max_new_tokens=args.testbed_tokens, batch_size=None, gen_batch_size=64, chunks=2,
                              fast_runs=2, draft=None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        results, stats = alternate(model, tok, opts, collect_responses(model, tok, opts, work), work)
        identical, shared, differ = compare(results["reference"]["labels"], results["fast"]["labels"])
    ref, fast = results["reference"], results["fast"]
    print(f"testbed: reference tok/s={ref['tokens_per_second']:.0f} fast tok/s={fast['tokens_per_second']:.0f} "
          f"tokens_per_forward={stats.tokens_per_forward:.2f}")
    print(f"testbed speedup={ref['seconds'] / fast['seconds']:.1f} labels_identical={str(identical).lower()} "
          f"branches_compared={shared} branches_differing={differ}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="shrunk configs and workload (a CPU smoke run)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: bfloat16 (float32 with --small)")
    p.add_argument("--batch-size", type=int, default=None, help="engine, bare-forward and generate rows "
                                                                 "(default: 256; 16 with --small)")
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--testbed-responses", type=int, default=None, help="default: 3 (1 with --small)")
    p.add_argument("--testbed-tokens", type=int, default=None, help="default: 96 (48 with --small)")
    args = p.parse_args()
    args.dtype = args.dtype or ("float32" if args.small else "bfloat16")
    args.batch_size = args.batch_size or (16 if args.small else 256)
    args.testbed_responses = args.testbed_responses or (1 if args.small else 3)
    args.testbed_tokens = args.testbed_tokens or (48 if args.small else 96)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"machine: {machine_line()}", flush=True)
    print(f"device={args.device} ({name}) torch={torch.__version__} small={args.small}", flush=True)
    t0 = time.perf_counter()
    for m in args.models:
        throughput(m, args)
    agreement(args)
    print(f"gpu_check done in {time.perf_counter() - t0:.0f}s")


if __name__ == "__main__":
    main()
