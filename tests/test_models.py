"""Model resolution, the GGUF conversion cache, vocabulary size and the weights/tokenizer fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
    assert models.converted(spec, create=True) == spec  # caching off: loaded from the GGUF file itself


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


def test_vocab_rows_counts_padded_embedding_rows(random_model_dir, testbed_tokenizer):
    model, _ = models.load_model(str(random_model_dir), device="cpu")
    assert models.vocab_rows(model) == len(testbed_tokenizer)
    model.resize_token_embeddings(len(testbed_tokenizer) + 38)
    assert models.vocab_rows(model) == len(testbed_tokenizer) + 38


def test_weights_fingerprint(random_model_dir):
    model, _ = models.load_model(str(random_model_dir), device="cpu")
    again, _ = models.load_model(str(random_model_dir), device="cpu")
    bf16, _ = models.load_model(str(random_model_dir), dtype="bfloat16", device="cpu")
    fp = models.weights_fingerprint(model)
    assert len(fp) == 16 and fp == models.weights_fingerprint(again) != models.weights_fingerprint(bf16)
    with torch.no_grad():
        again.model.layers[1].mlp.down_proj.weight.mul_(1.001)  # a fine-tune touches most values of a tensor
    assert models.weights_fingerprint(again) != fp


def test_zoo_names_build_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CFT_MODEL_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match="unknown zoo family 'gpt2' in 'zoo:gpt2'; choose from qwen2.5"):
        models.resolve("zoo:gpt2")
    spec = models.resolve("zoo:mistral")
    assert Path(spec.path).parent == tmp_path / "zoo" and (Path(spec.path) / "config.json").is_file()
    stamp = (Path(spec.path) / "model.safetensors").stat().st_mtime_ns
    assert models.resolve("zoo:mistral") == spec
    assert (Path(spec.path) / "model.safetensors").stat().st_mtime_ns == stamp  # not built again
    assert [p.name for p in (tmp_path / "zoo").iterdir()] == [Path(spec.path).name]  # no temporary left over


@pytest.fixture(scope="module")
def bf16_model_dir(tmp_path_factory, testbed_tokenizer):
    """A tiny Llama saved in bfloat16, as SmolLM2's checkpoint is."""
    from cft.testbed.pretrain import PretrainConfig, build_model

    model = build_model(testbed_tokenizer, PretrainConfig(hidden_size=32, layers=1, heads=2, intermediate_size=64))
    path = tmp_path_factory.mktemp("bf16_model")
    model.to(torch.bfloat16).save_pretrained(path)
    testbed_tokenizer.save_pretrained(path)
    return path


def test_a_cpu_without_native_bf16_gets_float32_for_auto_and_one_warning_for_bf16(bf16_model_dir, monkeypatch,
                                                                               caplog):
    """AVX2-only CPUs emulate bfloat16 (several times slower than float32). No such CPU is at hand, so the detection
    is patched; ``get_cpu_capability()`` is not what decides (it says AVX512 with and without AVX512-BF16)."""
    monkeypatch.setattr(models, "cpu_bf16_native", lambda: False)
    caplog.set_level("WARNING", logger="cft.models")
    model, _ = models.load_model(str(bf16_model_dir), "auto", "cpu")
    assert next(model.parameters()).dtype == torch.float32
    assert not caplog.records
    model, _ = models.load_model(str(bf16_model_dir), "bfloat16", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16  # asked for: kept, with the warning
    [warning] = caplog.records
    message = warning.getMessage()
    assert "\n" not in message and "several times slower than float32" in message and "AVX512-BF16" in message
    assert models.resolve_dtype("auto", "cuda") == "auto"  # a GPU keeps the checkpoint's dtype
    assert models.resolve_dtype("float32", "cpu") == "float32"


def test_a_cpu_with_native_bf16_keeps_the_checkpoint_dtype_without_a_warning(bf16_model_dir, monkeypatch, caplog):
    monkeypatch.setattr(models, "cpu_bf16_native", lambda: True)
    caplog.set_level("WARNING", logger="cft.models")
    model, _ = models.load_model(str(bf16_model_dir), "auto", "cpu")
    assert next(model.parameters()).dtype == torch.bfloat16
    models.load_model(str(bf16_model_dir), "bfloat16", "cpu")
    assert not caplog.records


def test_machine_line_names_the_cpu_and_its_capability():
    line = models.machine_line()
    assert f"capability={torch.backends.cpu.get_cpu_capability()}" in line
    assert f"cpu={models.cpu_name()!r}" in line and models.cpu_name()
    assert f"native_bf16={str(models.cpu_bf16_native()).lower()}" in line
