"""Model resolution and the GGUF conversion cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from cft import models


def test_resolve_names(tmp_path):
    assert models.resolve("testbed").path == str(models.TESTBED_DIR)
    assert models.resolve("org/some-model") == models.ModelSpec("org/some-model", "org/some-model")
    gguf = tmp_path / "m.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    spec = models.resolve(str(gguf))
    assert (spec.path, spec.gguf_file) == (str(tmp_path.resolve()), "m.Q4.gguf")


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        models.resolve(str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.resolve(str(tmp_path))


def test_gguf_cache_key_follows_content_and_setting(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"one")
    monkeypatch.setenv(models.GGUF_CACHE_ENV, str(tmp_path / "cache"))
    first = models.gguf_cache_dir(gguf)
    assert first.parent == tmp_path / "cache" and first.name.startswith("m-")
    assert models.gguf_cache_dir(gguf) == first
    gguf.write_bytes(b"two, longer")  # a changed file never reuses the old conversion
    assert models.gguf_cache_dir(gguf) != first
    monkeypatch.setenv(models.GGUF_CACHE_ENV, "off")
    assert models.gguf_cache_dir(gguf) is None
    spec = models.resolve(str(gguf))
    assert models._converted(spec, create=True) == spec  # caching off: loaded from the GGUF file itself


@pytest.mark.slow
def test_gguf_folder_conversion_is_exact(monkeypatch, smollm2_gguf):
    """SmolLM2's GGUF loaded directly and through its cached folder: same weights, tokens and config."""
    import torch

    from cft.prompts import render_ids

    gguf = str(smollm2_gguf)
    cached_model, cached_tok = models.load_model(gguf)  # the default cache: converted here or by an earlier run
    spec = models.resolve(gguf)
    assert (models.gguf_cache_dir(Path(spec.path) / spec.gguf_file) / "config.json").is_file()
    monkeypatch.setenv(models.GGUF_CACHE_ENV, "off")
    direct_model, direct_tok = models.load_model(gguf)

    a, b = direct_model.state_dict(), cached_model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert direct_model.generation_config.to_dict() == cached_model.generation_config.to_dict()
    texts = ["What is 2 + 3?", "Let $x=\\frac{1}{2}$; so \\boxed{0.5}.\n\n  Done", "Ünïcödé 数学 🙂 <|im_end|>"]
    assert [direct_tok(t).input_ids for t in texts] == [cached_tok(t).input_ids for t in texts]
    for template in ("chat", "qwen25-math-cot"):
        assert render_ids(direct_tok, texts[0], template) == render_ids(cached_tok, texts[0], template)
    assert (direct_tok.pad_token_id, direct_tok.eos_token_id) == (cached_tok.pad_token_id, cached_tok.eos_token_id)
