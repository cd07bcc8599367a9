"""Fingerprints of tokenizers and weights, and the checks that keep an artifact with its model."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from cft import fingerprints, provenance
from cft.cli import main
from cft.models import load_tokenizer
from cft.provenance import ProvenanceError


def labels_file(folder: Path, model: str | None, name: str = "labels.jsonl") -> Path:
    """A one-record labels file; its sidecar names ``model`` (no sidecar when None)."""
    text = "2+2=4. The answer is 4"
    path = folder / name
    path.write_text(json.dumps({
        "schema": "cft.labels/1", "key": "k0", "id": "p0", "question": "What is 2+2?", "gold": "4",
        "response": text, "critical_spans": [[4, 5]], "prompt_ids": [1, 2], "response_ids": [3, 4],
        "critical": [1, 0], "eligible": [1, 0], "branches": [[], []], "greedy": True}) + "\n")
    if model is not None:
        (folder / (name + ".meta.json")).write_text(json.dumps({"stage": "identify", "config": {"model": model}}))
    return path


def ns(**kw) -> argparse.Namespace:
    return argparse.Namespace(**{"allow_model_mismatch": False, "merge": False, **kw})


def test_tokenizer_fingerprint_from_files_equals_the_loaded_tokenizer():
    folder, _ = fingerprints.model_files("testbed")
    assert fingerprints._tokenizer_from_files(folder) == fingerprints._tokenizer_from_object(load_tokenizer("testbed"))


def test_tokenizer_fingerprint_of_smollm2_files_equals_the_loaded_tokenizer(smollm2_gguf):
    from cft.models import converted, resolve

    spec = converted(resolve("smollm2"), create=False)
    if spec.gguf_file is not None:
        pytest.skip("SmolLM2's GGUF file is not converted to a folder yet")
    assert fingerprints._tokenizer_from_files(Path(spec.path)) == fingerprints._tokenizer_from_object(
        load_tokenizer("smollm2"))
    assert provenance.tokenizer_fingerprint("smollm2") != provenance.tokenizer_fingerprint("testbed")


def test_same_tokenizer_other_weights(random_model_dir):
    a, b = provenance.fingerprint("testbed"), provenance.fingerprint(str(random_model_dir))
    assert a.tokenizer == b.tokenizer and a.weights != b.weights
    assert a == provenance.fingerprint("testbed")  # stable


def test_a_sampled_hash_for_big_files_sees_changes_in_its_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprints, "FULL_HASH_LIMIT", 100)
    monkeypatch.setattr(fingerprints, "BLOCK", 10)
    monkeypatch.setattr(fingerprints, "BLOCKS", 4)
    f = tmp_path / "w.bin"
    data = bytearray(range(250))
    f.write_bytes(bytes(data))
    first = fingerprints.file_hash(f)
    assert fingerprints.file_hash(f) == first
    data[0] ^= 1  # in the first block
    f.write_bytes(bytes(data))
    assert fingerprints.file_hash(f) != first  # new content and mtime: hashed again
    f.write_bytes(bytes(data) + b"x")
    assert fingerprints.file_hash(f) != first  # the size counts


def test_identify_refuses_generations_of_another_model(tmp_path, random_model_dir):
    """An old artifact recording only a model path: its files are fingerprinted."""
    gen = labels_file(tmp_path, str(random_model_dir), "gen.jsonl")
    with pytest.raises(ProvenanceError, match=r"made with model '.*random_model.*' but --model is 'testbed': "
                                              r"the weights differ"):
        provenance.check("identify", ns(input=str(gen), model="testbed"), set())
    lines, override = provenance.check("identify", ns(input=str(gen), model="testbed", allow_model_mismatch=True),
                                       set())
    assert len(lines) == 1 and "allowed by --allow-model-mismatch" in lines[0] and "weights" in override


def test_train_on_labels_of_the_same_tokenizer_says_so(tmp_path, random_model_dir):
    labels = labels_file(tmp_path, "testbed")
    lines, override = provenance.check("train", ns(input=str(labels), model=str(random_model_dir)), set())
    assert override is None and len(lines) == 1 and "same tokenizer, different weights" in lines[0]


def test_same_name_without_fingerprints_hashes_nothing(tmp_path, monkeypatch):
    labels = labels_file(tmp_path, "testbed")

    def no_hashing(name):
        raise AssertionError("fingerprinted although the names match")

    monkeypatch.setattr(provenance, "weight_files_fingerprint", no_hashing)
    monkeypatch.setattr(provenance, "tokenizer_fingerprint", no_hashing)
    assert provenance.check("identify", ns(input=str(labels), model="testbed"), set()) == ([], None)


def test_a_recorded_fingerprint_catches_a_changed_folder_of_the_same_name(tmp_path, random_model_dir):
    import shutil

    from safetensors.torch import load_file, save_file

    model = tmp_path / "m"
    shutil.copytree(random_model_dir, model)
    gen = labels_file(tmp_path, str(model), "gen.jsonl")
    meta_path = Path(str(gen) + ".meta.json")
    meta = json.loads(meta_path.read_text())
    meta["provenance"] = provenance.fingerprint(str(model)).as_dict()
    meta_path.write_text(json.dumps(meta))
    assert provenance.check("identify", ns(input=str(gen), model=str(model)), set()) == ([], None)
    weights = load_file(model / "model.safetensors")
    save_file({k: v + 1 for k, v in weights.items()}, model / "model.safetensors")  # "retrained" in place
    with pytest.raises(ProvenanceError, match="the weights differ"):
        provenance.check("identify", ns(input=str(gen), model=str(model)), set())


def test_rescore_checks_only_an_explicit_model(tmp_path, random_model_dir, smollm2_gguf):
    (tmp_path / "samples.jsonl").write_text("")
    (tmp_path / "samples.jsonl.meta.json").write_text(json.dumps({"config": {"model": "smollm2"}}))
    args = ns(rescore=str(tmp_path), model="testbed")
    assert provenance.check("eval", args, set()) == ([], None)  # --model defaulted: rescoring needs no model
    with pytest.raises(ProvenanceError, match="tokenizer differ"):
        provenance.check("eval", args, {"model"})


def test_cli_transfer_to_the_same_tokenizer_is_refused_and_the_override_recorded(tmp_path, capsys):
    labels = labels_file(tmp_path, "testbed")
    out = tmp_path / "t.jsonl"
    assert main(["transfer", "--input", str(labels), "--model", "testbed", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nothing to transfer" in err[0] and not out.exists()
    assert main(["transfer", "--input", str(labels), "--model", "testbed", "--out", str(out),
                 "--allow-model-mismatch"]) == 0
    prov = json.loads(Path(str(out) + ".meta.json").read_text())["provenance"]
    assert prov["model"] == "testbed" and prov["tokenizer"] == provenance.tokenizer_fingerprint("testbed")
    assert prov["override"].startswith("--allow-model-mismatch: ") and "nothing to transfer" in prov["override"]


def test_cli_transfer_then_train_follows_the_tokenizer(tmp_path, capsys, smollm2_gguf, monkeypatch):
    """testbed labels -> SmolLM2 tokens; training testbed on the result points back to transfer."""
    labels = labels_file(tmp_path, "testbed")
    out = tmp_path / "smol.jsonl"
    assert main(["transfer", "--input", str(labels), "--model", "smollm2", "--out", str(out)]) == 0
    prov = json.loads(Path(str(out) + ".meta.json").read_text())["provenance"]
    assert prov["model"] == "smollm2" and "override" not in prov
    capsys.readouterr()

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("cft.models.load_model", forbidden)
    assert main(["train", "--model", "testbed", "--input", str(out), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cft transfer" in err[0] and "'smollm2'" in err[0] and "'testbed'" in err[0]


def test_cli_accepts_an_artifact_without_metadata_with_one_warning(tmp_path, capsys, smollm2_gguf):
    labels = labels_file(tmp_path, None)
    assert main(["transfer", "--input", str(labels), "--model", "smollm2", "--out", str(tmp_path / "t.jsonl")]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning:" in err[0] and "no metadata" in err[0]


def test_generate_stamps_its_output(tmp_path):
    out = tmp_path / "g.jsonl"
    assert main(["generate", "--model", "testbed", "--device", "cpu", "--data", "testbed:train", "--limit", "1",
                 "--max-new-tokens", "8", "--out", str(out)]) == 0
    prov = json.loads(Path(str(out) + ".meta.json").read_text())["provenance"]
    assert prov == provenance.fingerprint("testbed").as_dict()


def test_every_written_artifact_records_its_fingerprints(tmp_path):
    """Through ``write_meta``, whichever entry point ran the stage (library callers too)."""
    from cft.artifacts import write_meta

    path = write_meta(tmp_path / "a.jsonl", {"config": {"model": "testbed"}})
    assert json.loads(path.read_text())["provenance"] == provenance.fingerprint("testbed").as_dict()
    for name in ("not-a-model-here", "a/b/c"):  # a name given to an in-process model; an invalid hub id
        prov = json.loads(write_meta(tmp_path / "b.jsonl", {"config": {"model": name}}).read_text())["provenance"]
        assert prov == {"model": name, "tokenizer": None, "weights": None}
    assert "provenance" not in json.loads(write_meta(tmp_path / "m.json", {"gsm8k": {"accuracy": 1}}).read_text())


def test_view_checks_the_tokenizer_only_when_a_model_is_given(tmp_path, smollm2_gguf):
    labels = labels_file(tmp_path, "testbed")
    args = ns(labels=str(labels), model=None)
    assert provenance.check("view", args, set()) == ([], None)  # decoded with the sidecar's model
    with pytest.raises(ProvenanceError, match="LABELS .* was made with model 'testbed' but --model is 'smollm2'"):
        provenance.check("view", ns(labels=str(labels), model="smollm2"), {"model"})
