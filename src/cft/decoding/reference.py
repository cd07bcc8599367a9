"""The per-branch reference as a backend (``reference``): one plain greedy ``generate`` per branch, re-encoding
prompt and prefix each time (``protocol.reference_branch``): the protocol's definition, for any architecture."""

from __future__ import annotations

from cft.decoding.backends import register
from cft.protocol import finish_branch, reference_branch


def branches(model, tok, works, cfg, proto, on_done, progress, max_prompt) -> None:
    for work, _ in works:
        for t, alts in enumerate(work.alternatives):
            for j, a in enumerate(alts):
                cont, margin = reference_branch(model, tok, proto, work.prompt_ids, work.response_ids[:t] + [a], t)
                finish_branch(work, t, j, cont, proto, margin)
                progress.advance(0, tokens=len(cont) + 1)
        on_done(work)


register("reference", branches=branches)
