"""Stage B at a fraction of its cost: a learned critical-token predictor, checked against exact labels in every run.

``cft identify --predict`` labels a seeded subset of the responses exactly (the usual counterfactual decoding),
trains a small probe on features of one teacher-forced pass (``features``: hidden states at the position and
after it, top-1 probability, top-1/top-2 margin, entropy, the response token's rank and probability, the
embeddings and kinds of the token and its alternatives, relative position), and predicts the other responses.
Positions whose predicted probability lies in an uncertain band ``[lo, hi)`` are still decoded exactly; the
others take the probe's label (critical iff p >= hi). A held-out part of the exact subset never trains the
probe: the band is chosen on it, at the least decoding cost that reaches the target precision and recall, and
the probe's precision, recall, F1 and AUC on it, the band's quality (cross-fitted: each half's band scored on
the other half) and the decoded tokens against an estimate of the exact run's are printed and stored in the
labels' metadata (``summary.predict``).

The subset is a seeded sample of every response of the run (all shards'); under sharding each shard trains
its own probe on its part of the subset, so its band and quality are its own (the merge pools them).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

from cft.artifacts import InputError
from cft.protocol import ranked

KINDS = ("digit", "operator", "other")  # the values of identify.token_kind (passed in as ``kind_of``)
ROLES = ("train", "heldout", "predicted")


@dataclass(frozen=True)
class Settings:
    """The predictor's options (fields of ``IdentifyConfig`` named ``predict_*``), validated."""

    fraction: float
    heldout: float
    seed: int
    recall: float
    precision: float
    band: tuple[float, float] | None
    probe: str
    layers: tuple[int, ...] | None

    @classmethod
    def of(cls, cfg) -> Settings:
        def bad(flag: str, msg: str) -> InputError:
            return InputError(flag, None, None, msg)

        if not 0 < cfg.predict_fraction < 1:
            raise bad("--predict-fraction", f"must be in (0, 1), not {cfg.predict_fraction}")
        if not 0 < cfg.predict_heldout < 1:
            raise bad("--predict-heldout", f"must be in (0, 1), not {cfg.predict_heldout}")
        for flag, v in (("--predict-recall", cfg.predict_recall), ("--predict-precision", cfg.predict_precision)):
            if not 0 < v <= 1:
                raise bad(flag, f"must be in (0, 1], not {v}")
        band = cfg.predict_band
        if band is not None:
            if len(band) != 2 or not 0 <= band[0] <= band[1] <= 1:
                raise bad("--predict-band", f"takes LO HI with 0 <= LO <= HI <= 1, not {band}")
            band = (float(band[0]), float(band[1]))
        if cfg.predict_probe not in ("logistic", "mlp"):
            raise bad("--predict-probe", f"choose logistic or mlp, not {cfg.predict_probe!r}")
        layers = tuple(cfg.predict_layers) if cfg.predict_layers else None
        return cls(cfg.predict_fraction, cfg.predict_heldout, cfg.predict_seed, cfg.predict_recall,
                   cfg.predict_precision, band, cfg.predict_probe, layers)


def roles(all_keys: list[str], fraction: float, heldout: float, seed: int) -> dict[str, str]:
    """Each response's role, from a seeded sample of every key of the run (so shards agree on it).

    At least 4 responses are labelled exactly and at least 2 of them held out (fewer responses: all exact).
    """
    rng = random.Random(seed)
    n = len(all_keys)
    n_exact = min(n, max(4, round(fraction * n)))
    exact = rng.sample(range(n), n_exact)
    n_held = min(n_exact, max(2, round(heldout * n_exact)))
    held = set(exact[:n_held])
    out = dict.fromkeys(all_keys, "predicted")
    for i in exact:
        out[all_keys[i]] = "heldout" if i in held else "train"
    return out


# -- features ---------------------------------------------------------------------------------------


def _scalars(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per position: top-1 prob, top-1 minus top-2 logit, entropy, log rank of y, log p(y), top-2 prob, ..."""
    logp = torch.log_softmax(logits, dim=-1)
    top = torch.topk(logp, 2, dim=-1).values
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    own = logp.gather(-1, y[:, None])[:, 0]
    rank = (logp > own[:, None]).sum(-1).float()
    return torch.stack([top[:, 0].exp(), top[:, 0] - top[:, 1], entropy, torch.log1p(rank), own, top[:, 1].exp(),
                        (rank == 0).float(), own - top[:, 0]], dim=-1)


@torch.inference_mode()
def features(model, prompt_ids: list[int], response_ids: list[int], kind_of: Callable[[int], str],
             layers: tuple[int, ...] | None, k: int) -> torch.Tensor:
    """One row per response position from one teacher-forced pass (float32, on the CPU).

    Position t: the hidden states (``layers``; default the middle and the last) of the state that predicts
    y_t and of the state that has read it; the logit features (``_scalars``) at t and at t+1; the input
    embeddings of y_t and of its first two alternatives (the order (-logit, id) minus y_t, as stage B tests
    them); the kinds (one-hot) of y_t and of those alternatives; t / L and (L - t) / 256.
    """
    ids = torch.tensor([prompt_ids + response_ids], device=model.device)
    out = model(input_ids=ids, output_hidden_states=True)
    p, n = len(prompt_ids), len(response_ids)
    hidden = out.hidden_states
    chosen = layers or (len(hidden) // 2, len(hidden) - 1)
    for layer in chosen:
        if not -len(hidden) <= layer < len(hidden):
            raise InputError("--predict-layers", None, None,
                             f"layer {layer} does not exist (the model has hidden states 0..{len(hidden) - 1})")
    states = []
    for layer in chosen:
        h = hidden[layer][0].float()
        states += [h[p - 1 : p - 1 + n], h[p : p + n]]
    logits = out.logits[0, p - 1 : p - 1 + n].float()
    y = torch.tensor(response_ids, device=model.device)
    scal = _scalars(logits, y)
    nxt = torch.cat([scal[1:], torch.zeros_like(scal[:1])])
    _, order = ranked(logits, max(k, 2) + 1)
    alts = []
    for t, row in enumerate(order.tolist()):
        others = [a for a in row if a != response_ids[t]][: max(k - 1, 1)]
        alts.append((others + [response_ids[t]] * 2)[:2])
    alt = torch.tensor(alts, device=model.device)
    emb = model.get_input_embeddings()
    embeds = [emb(y).float(), emb(alt[:, 0]).float(), emb(alt[:, 1]).float()]
    kinds = torch.tensor([[float(kind_of(tok) == c) for tok in (y_t, *a) for c in KINDS]
                          for y_t, a in zip(response_ids, alts)], device=model.device)
    t = torch.arange(n, device=model.device, dtype=torch.float32)
    where = torch.stack([t / n, (n - t) / 256], dim=-1)
    return torch.cat([*states, *embeds, scal, nxt, kinds.reshape(n, 3 * len(KINDS)), where], dim=-1).cpu()


# -- the probe ----------------------------------------------------------------------------------------


class Probe:
    """Logistic regression or a one-hidden-layer MLP on standardized features; seeded full-batch AdamW."""

    def __init__(self, kind: str, seed: int, hidden: int = 64, steps: int = 300, lr: float = 3e-3,
                 weight_decay: float = 1e-2):
        self.kind, self.seed, self.hidden, self.steps = kind, seed, hidden, steps
        self.lr, self.weight_decay = lr, weight_decay
        self.net: torch.nn.Module | None = None

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> Probe:
        if len(x) == 0 or y.min() == y.max():
            raise InputError("--predict-fraction", None, None,
                             f"the probe's training positions hold {'no' if len(x) == 0 else 'one class of'} "
                             "labels; raise --predict-fraction (or label exactly)")
        self.mean, self.std = x.mean(0), x.std(0).clamp_min(1e-6)
        gen = torch.Generator().manual_seed(self.seed)
        d = x.shape[1]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            if self.kind == "mlp":
                self.net = torch.nn.Sequential(torch.nn.Linear(d, self.hidden), torch.nn.ReLU(),
                                               torch.nn.Linear(self.hidden, 1))
            else:
                self.net = torch.nn.Linear(d, 1)
        xs = (x - self.mean) / self.std
        pos = float(y.mean())
        # balanced loss: the rarer class weighs as much as the other
        weight = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        with torch.enable_grad():
            for _ in range(self.steps):
                opt.zero_grad()
                loss = torch.nn.functional.binary_cross_entropy_with_logits(self.net(xs)[:, 0], y, weight=weight)
                loss.backward()
                opt.step()
        return self

    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> list[float]:
        return torch.sigmoid(self.net((x - self.mean) / self.std)[:, 0]).tolist()


# -- quality and the band -------------------------------------------------------------------------------


def confusion(pairs: list[tuple[float, int, float]], band: tuple[float, float]) -> dict:
    """Counts of labelling ``pairs`` (prob, exact label, cost) with ``band``: exact inside it, p >= hi outside."""
    lo, hi = band
    tp = fp = fn = 0
    cost = 0.0
    for p, y, c in pairs:
        if lo <= p < hi:
            tp += y
            cost += c
        else:
            pred = p >= hi
            tp += y and pred
            fp += pred and not y
            fn += y and not pred
    return {"tp": tp, "fp": fp, "fn": fn, "positions": len(pairs), "decoded_positions":
            sum(lo <= p < hi for p, _, _ in pairs), "cost": cost, "exact_cost": sum(c for _, _, c in pairs)}


def scores(counts: dict) -> dict:
    """Precision, recall, F1 and the cost fraction from ``confusion`` counts (pooled counts work too)."""
    tp, fp, fn = counts["tp"], counts["fp"], counts["fn"]
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1,
            "cost_fraction": counts["cost"] / counts["exact_cost"] if counts["exact_cost"] else 0.0}


def auc(pairs: list[tuple[float, int, float]]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None without both classes."""
    ordered = sorted(pairs, key=lambda x: x[0])
    n_pos = sum(y for _, y, _ in ordered)
    n_neg = len(ordered) - n_pos
    if not n_pos or not n_neg:
        return None
    rank_sum, i = 0.0, 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j][0] == ordered[i][0]:
            j += 1
        rank_sum += (i + j + 1) / 2 * sum(y for _, y, _ in ordered[i:j])  # mean 1-based rank of the tie group
        i = j
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def choose_band(pairs: list[tuple[float, int, float]], recall: float, precision: float) -> tuple[float, float]:
    """The band ``[lo, hi)`` of least cost whose labelling of ``pairs`` reaches both targets.

    Cut points are the gaps between sorted probabilities: recall depends on lo alone, and for each lo the
    cheapest feasible hi is the lowest one with enough precision, which only rises with lo (two pointers).
    """
    ordered = sorted(pairs, key=lambda x: x[0])
    probs = [p for p, _, _ in ordered]
    n = len(ordered)
    cum_y, cum_c = [0], [0.0]
    for _, y, c in ordered:
        cum_y.append(cum_y[-1] + y)
        cum_c.append(cum_c[-1] + c)
    n_pos = cum_y[-1]

    def cut(i: int) -> float:  # a threshold with exactly the first i positions below it
        if i == 0:
            return 0.0
        if i == n:
            return 1.0 + 1e-9
        return (probs[i - 1] + probs[i]) / 2 if probs[i] > probs[i - 1] else probs[i]

    valid = [i for i in range(n + 1) if i in (0, n) or probs[i] > probs[i - 1]]  # cuts that split no tie
    valid_set = set(valid)
    best, hi_idx = (math.inf, 0, n), 0
    for lo in valid:
        tp = n_pos - cum_y[lo]
        if n_pos and tp / n_pos < recall:
            break
        hi_idx = max(hi_idx, lo)
        while hi_idx < n:
            fp = (n - hi_idx) - (n_pos - cum_y[hi_idx])
            if hi_idx in valid_set and (tp / (tp + fp) if tp + fp else 1.0) >= precision:
                break
            hi_idx += 1
        cost = cum_c[hi_idx] - cum_c[lo]
        if cost < best[0]:
            best = (cost, lo, hi_idx)
    _, lo, hi = best
    return cut(lo), cut(hi)


# -- one run ----------------------------------------------------------------------------------------------


def position_cost(rec: dict, t: int) -> float:
    """Decoded tokens of position t's branches in an exact labels record (the rest of the response when the
    continuations were not stored)."""
    ran = [b for b in rec["branches"][t] if b["ok"] is not None or b["verify_error"]]
    rest = len(rec["response_ids"]) - t - 1
    return float(sum(len(b["ids"]) if b["ids"] is not None else rest for b in ran))


def heldout_pairs(records: list[dict]) -> list[tuple[float, int, float]]:
    """(probe probability, exact label, decoding cost) of every tested position of held-out records."""
    return [(p, c, position_cost(rec, t)) for rec in records if rec["predict_role"] == "heldout"
            for t, (p, c, e) in enumerate(zip(rec["probe_prob"], rec["critical"], rec["eligible"])) if e]


def quality(records: list[dict], bands: list[tuple[float, float]]) -> dict:
    """The probe (threshold 0.5) and the band on the held-out records (``bands[i]``: the band of record i's
    shard), measured against their exact labels."""
    pairs = heldout_pairs(records)
    probe = confusion(pairs, (0.5, 0.5))
    held = [(rec, bands[i]) for i, rec in enumerate(records) if rec["predict_role"] == "heldout"]
    band = _pool(confusion(heldout_pairs([r]), b) for r, b in held)
    return {"heldout_positions": len(pairs), "heldout_critical": sum(y for _, y, _ in pairs),
            "probe": {**scores(probe), "auc": auc(pairs), "counts": probe},
            "band_in_sample": {**scores(band), "counts": band}}


def _pool(counts) -> dict:
    total = {"tp": 0, "fp": 0, "fn": 0, "positions": 0, "decoded_positions": 0, "cost": 0.0, "exact_cost": 0.0}
    for c in counts:
        for k in total:
            total[k] += c[k]
    return total


def crossfit(records: list[dict], settings: Settings, seed: int) -> dict:
    """The band rule scored on data that did not choose it: the held-out responses in two seeded halves, each
    half's band chosen on the other half (pooled counts); a band given with ``--predict-band`` serves both."""
    held = [r for r in records if r["predict_role"] == "heldout"]
    random.Random(seed).shuffle(held)
    halves = [held[: len(held) // 2], held[len(held) // 2 :]]
    counts = []
    for a, b in (halves, halves[::-1]):
        band = settings.band or choose_band(heldout_pairs(a), settings.recall, settings.precision)
        counts.append(confusion(heldout_pairs(b), band))
    pooled = _pool(counts)
    return {**scores(pooled), "counts": pooled}


class Predictor:
    """The ``--predict`` part of one identify run (this process's shard): roles, probe, band, record fields."""

    def __init__(self, model, cfg, all_keys: list[str], kind_of: Callable[[int], str]):
        self.model, self.cfg, self.kind_of = model, cfg, kind_of
        self.settings = Settings.of(cfg)
        self.role = roles(all_keys, self.settings.fraction, self.settings.heldout, self.settings.seed)
        self.probe: Probe | None = None
        self.band: tuple[float, float] | None = None
        self.probs: dict[str, list[float | None]] = {}  # predicted responses: per position, None where untested
        self.band_choice: dict = {}

    def _features(self, rec: dict) -> torch.Tensor:
        return features(self.model, rec["prompt_ids"], rec["response_ids"], self.kind_of, self.settings.layers,
                        self.cfg.k)

    def run(self, items: list[tuple[dict, str]], done: dict[str, dict], decode) -> None:
        """Label the subset exactly, train the probe, choose the band, then label the rest.

        ``decode(todo, adjust)`` labels the (record, key) pairs of ``todo`` with the run's engine, calling
        ``adjust(work)`` on each response before it is decoded; finished records land in ``done``.
        """
        subset = [(r, k) for r, k in items if self.role[k] != "predicted"]
        decode([(r, k) for r, k in subset if k not in done], None)
        xs, ys = [], []
        for rec, key in subset:
            if self.role[key] == "train":
                x = self._features(rec)
                tested = torch.tensor(done[key]["eligible"], dtype=torch.bool)
                xs.append(x[tested])
                ys.append(torch.tensor(done[key]["critical"], dtype=torch.float32)[tested])
        self.probe = Probe(self.settings.probe, self.settings.seed).fit(
            torch.cat(xs) if xs else torch.zeros(0, 1), torch.cat(ys) if ys else torch.zeros(0))
        for rec, key in subset:  # the probe's probability on every exact response (in-sample on its training set)
            probs = self.probe.predict(self._features(rec))
            done[key]["probe_prob"] = [p if e else None for p, e in zip(probs, done[key]["eligible"])]
        held = [done[k] for _, k in subset if self.role[k] == "heldout"]
        if self.settings.band is not None:
            self.band = self.settings.band
        else:
            self.band = choose_band(heldout_pairs(held), self.settings.recall, self.settings.precision)
        self.band_choice = crossfit(held, self.settings, self.settings.seed)
        decode([(r, k) for r, k in items if self.role[k] == "predicted" and k not in done], self.adjust)

    def adjust(self, work) -> None:
        """Score a predicted response and keep only the band's positions for decoding."""
        probs = self.probe.predict(self._features(work.record))
        kept = []
        for t, alts in enumerate(work.alternatives):
            if not alts:
                kept.append(None)
                continue
            kept.append(probs[t])
            if not self.band[0] <= probs[t] < self.band[1]:
                work.alternatives[t], work.ranks[t], work.results[t] = [], [], []
                work.alt_margin[t] = None
        self.probs[work.key] = kept

    def fields(self, key: str, critical: list[int], eligible: list[int]) -> dict:
        """A record's per-position fields; a predicted response's probe labels go into ``critical``/``eligible``."""
        role = self.role[key]
        n = len(critical)
        source = ["exact"] * n
        if role != "predicted":
            return {"label_source": source, "probe_prob": [None] * n, "predict_role": role}
        probs = self.probs[key]
        lo, hi = self.band
        for t, p in enumerate(probs):
            if p is not None and not lo <= p < hi:
                critical[t], eligible[t], source[t] = int(p >= hi), 1, "predicted"
        return {"label_source": source, "probe_prob": probs, "predict_role": role}

    def summary(self, labels: list[dict]) -> dict:
        """What the run measured (see ``summarize``), for this process's labels."""
        return summarize(labels, [self.band] * len(labels), self.settings, self.band_choice,
                         {"band": list(self.band), "band_source": "given" if self.settings.band else "chosen"})


def exact_fields(n: int) -> dict:
    """The per-position fields of a response labelled without ``--predict``."""
    return {"label_source": ["exact"] * n, "probe_prob": [None] * n, "predict_role": ""}


def summarize(labels: list[dict], bands: list[tuple[float, float]], settings: Settings, crossfitted: dict,
              extra: dict) -> dict:
    """Roles, held-out quality, and decoded tokens against an estimate of the exact run's, from the records.

    The estimate: the exact responses' measured decoding cost, scaled to the predicted responses by the sum
    over tested positions of the tokens after them (a branch's cost grows with what follows it).
    """
    count = {r: sum(rec["predict_role"] == r for rec in labels) for r in ROLES}
    exact = [r for r in labels if r["predict_role"] != "predicted"]
    predicted = [r for r in labels if r["predict_role"] == "predicted"]

    def cost(recs):
        return sum(position_cost(r, t) for r in recs for t in range(len(r["response_ids"])))

    def weight(recs):
        return sum(len(r["response_ids"]) - t for r in recs for t, e in enumerate(r["eligible"]) if e)

    exact_cost, predicted_cost = cost(exact), cost(predicted)
    per_weight = exact_cost / max(weight(exact), 1)
    estimate = exact_cost + per_weight * weight(predicted)
    n_pred = sum(s == "predicted" for r in predicted for s in r["label_source"])
    return {
        **extra, "target": {"recall": settings.recall, "precision": settings.precision},
        "probe_kind": settings.probe, "fraction": settings.fraction, "heldout_share": settings.heldout,
        "seed": settings.seed, "responses": count,
        "predicted_positions": n_pred,
        "decoded_positions_of_predicted": sum(sum(r["eligible"]) for r in predicted) - n_pred,
        **quality(labels, bands), "band_crossfit": crossfitted,
        "decoded_tokens_exact_part": exact_cost, "decoded_tokens_predicted_part": predicted_cost,
        "exact_tokens_estimate": estimate,
        "decoded_fraction_estimate": (exact_cost + predicted_cost) / estimate if estimate else None,
    }


def merge(summaries: list[dict], labels: list[dict]) -> dict:
    """The merged run's ``summary.predict``: quality and costs over every shard's records, each with its band."""
    count = len(summaries)
    bands = [tuple(summaries[i % count]["band"]) for i in range(len(labels))]
    first = summaries[0]
    settings = Settings(first["fraction"], first["heldout_share"], first["seed"], first["target"]["recall"],
                        first["target"]["precision"], None, first["probe_kind"], None)
    crossfitted = _pool(s["band_crossfit"]["counts"] for s in summaries)
    return summarize(labels, bands, settings, {**scores(crossfitted), "counts": crossfitted},
                     {"band": None, "bands_by_shard": [s["band"] for s in summaries],
                      "band_source": first["band_source"]})


def print_summary(s: dict) -> None:
    probe, band, cf = s["probe"], s["band_in_sample"], s["band_crossfit"]
    r = s["responses"]
    auc_text = f"{probe['auc']:.3f}" if probe["auc"] is not None else "n/a"
    band_text = (f"[{s['band'][0]:.3f}, {s['band'][1]:.3f})" if s.get("band") is not None
                 else "per shard " + ", ".join(f"[{lo:.3f}, {hi:.3f})" for lo, hi in s["bands_by_shard"]))
    print(f"predict: {r['train']} responses trained the {s['probe_kind']} probe, {r['heldout']} held out "
          f"({s['heldout_positions']} positions), {r['predicted']} predicted")
    print(f"held-out quality (exact labels): probe at 0.5 precision {probe['precision']:.3f} recall "
          f"{probe['recall']:.3f} F1 {probe['f1']:.3f} AUC {auc_text}; band {band_text} ({s['band_source']}, "
          f"target recall {s['target']['recall']} precision {s['target']['precision']}): precision "
          f"{band['precision']:.3f} recall {band['recall']:.3f} F1 {band['f1']:.3f} in-sample, cross-fitted "
          f"precision {cf['precision']:.3f} recall {cf['recall']:.3f} F1 {cf['f1']:.3f}")
    frac = s["decoded_fraction_estimate"]
    print(f"predicted {s['predicted_positions']} positions, decoded {s['decoded_positions_of_predicted']} in the "
          f"band; decoded tokens {s['decoded_tokens_exact_part'] + s['decoded_tokens_predicted_part']:.0f} of an "
          f"estimated {s['exact_tokens_estimate']:.0f} for exact labels"
          + (f" ({frac:.1%})" if frac is not None else ""))
