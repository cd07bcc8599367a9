"""``cft transfer``: carry critical-token labels from one tokenizer to another (cross-family training).

Labels store the critical tokens as character spans of the response text (``critical_spans``). The
response text is tokenized again with the target tokenizer (with offsets), and a target token is
critical when its characters overlap a critical span; the prompt is rendered in the target's template.
The result is a ``cft.labels/2`` file that ``cft train --model TARGET`` accepts. Branch details do not
transfer (they belong to the source model) and are left empty.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from cft.artifacts import ResumableWriter, load_records, read_meta, record_key
from cft.config import MODEL_HELP, from_args, model_option, option
from cft.models import load_tokenizer
from cft.prompts import render_ids


@dataclass
class TransferConfig:
    """Resolved config of ``cft transfer`` (its options, ``CONFIGS``)."""

    input: str = option(help="labels JSONL from `cft identify` (any model)")
    out: str = option(help="output labels JSONL for the target model (cft.labels/2)")
    model: str = model_option(help="the target model (its tokenizer and chat template): " + MODEL_HELP)
    template: str = option("chat", "prompt template of the target (see cft generate)")


def transfer_record(rec: dict, tok, template: str) -> dict:
    """One labels record re-expressed in ``tok``'s tokens; covered characters are preserved."""
    text = rec["response"]
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans = rec["critical_spans"]
    critical = [int(any(s < end and start < e for s, e in spans)) for start, end in enc["offset_mapping"]]
    response_ids = list(enc["input_ids"]) + [tok.eos_token_id]
    critical.append(0)
    n = len(response_ids)
    return {
        "key": record_key("transfer", rec["key"], tok.name_or_path, template),
        "id": rec["id"], "question": rec["question"], "gold": rec["gold"],
        "prompt_ids": render_ids(tok, rec["question"], template), "response_ids": response_ids, "response": text,
        "critical": critical, "eligible": [1] * (n - 1) + [0], "greedy": False, "greedy_mismatches": [],
        "alt_margin": [None] * n, "label_source": ["transferred"] * n, "probe_prob": [None] * n, "predict_role": "",
        "branches": [[] for _ in range(n)],
        "critical_spans": [[a, b] for (a, b), c in zip(enc["offset_mapping"], critical) if c],
    }


def transfer(cfg: TransferConfig) -> dict:
    records = load_records(cfg.input, "labels")
    tok = load_tokenizer(cfg.model)
    if not tok.is_fast:
        raise ValueError(f"{cfg.model}: transfer needs a fast tokenizer (character offsets)")
    out = [transfer_record(r, tok, cfg.template) for r in records]
    writer = ResumableWriter(cfg.out, "labels")
    writer.write(out)
    tested = sum(sum(r["eligible"]) for r in out)
    summary = {"responses": len(out), "critical_fraction": sum(map(sum, (r["critical"] for r in out))) / max(tested, 1)}
    writer.finalize([r["key"] for r in out], {"stage": "transfer", "config": asdict(cfg), "summary": summary,
                                               "source_meta": read_meta(cfg.input), "time": time.time()})
    return summary


CONFIGS = (TransferConfig,)


def run(args) -> int:
    s = transfer(from_args(TransferConfig, args))
    print(f"transferred {s['responses']} responses; critical fraction in target tokens {s['critical_fraction']:.1%}")
    return 0
