"""The README's scale-out section, checked as written: its CPU commands run with 2 processes, and every
accelerate preset it points to loads with accelerate's own config loader and has valid values."""
from __future__ import annotations

import json
import math
import os
import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from accelerate.utils import DistributedType, PrecisionType

from tests.test_train import make_tiny_model, write_labels

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def scale_out_section() -> str:
    """The README text from '## Scaling out' to the next second-level heading."""
    text = (ROOT / "README.md").read_text()
    start = text.index("## Scaling out")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def readme_cpu_commands() -> list[str]:
    """The inline commands of the section that start two processes on CPU (each ends in `-m cft train ...`)."""
    cmds = re.findall(r"`((?:torchrun|ACCELERATE_USE_CPU=1 accelerate launch) [^`]*)`", scale_out_section())
    return [c for c in cmds if c.endswith("-m cft train ...")]


def test_the_readme_names_the_two_cpu_commands():
    cmds = readme_cpu_commands()
    assert [c.split()[0] for c in cmds] == ["torchrun", "ACCELERATE_USE_CPU=1"], cmds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_readme_cpu_commands_run_two_processes_with_one_process_loss_curve(tmp_path, testbed_tokenizer):
    """Each command of the README, its `...` replaced by a tiny model and 2 steps of 2 sequences per process, trains
    with world size 2, and its loss curve equals one process with the same global batch of 4."""
    from cft.models import load_model
    from cft.train import train, train_configs

    model = make_tiny_model(tmp_path / "model", testbed_tokenizer)
    _, tok = load_model(str(model), device="cpu")
    labels = write_labels(tmp_path / "eight.jsonl", tok, 8)
    common = f"--model {model} --input {labels} --method cft --max-steps 2 --lr 1e-2 --warmup 0"

    train(*train_configs(model=str(model), input=str(labels), method="cft", out=str(tmp_path / "one"), max_steps=2,
                         batch_size=4, lr=1e-2, warmup=0.0))
    want = _curve(tmp_path / "one")
    assert len(want["loss"]) == 2

    src = str(ROOT / "src")
    # torchrun reads its defaults from PET_* variables: a free port keeps it off ports other runs use
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "PET_MASTER_PORT": str(_free_port())}
    for i, cmd in enumerate(readme_cpu_commands()):
        out = tmp_path / f"run{i}"
        line = cmd.removesuffix("...") + f"{common} --batch-size 2 --out {shlex.quote(str(out))}"
        run = subprocess.run(["bash", "-c", line], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, f"{line}\n{run.stderr[-3000:]}"
        summary = json.loads((out / "train_summary.json").read_text())
        assert (summary["world_size"], summary["global_batch_size"]) == (2, 4), line
        got = _curve(out)
        for key in want:
            assert all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(want[key], got[key], strict=True)), \
                (line, key, want[key], got[key])


def _curve(out: Path) -> dict[str, list[float]]:
    history = json.loads((out / "train_summary.json").read_text())["log_history"]
    return {k: [h[k] for h in history if k in h and "train_runtime" not in h] for k in ("loss", "grad_norm")}


# --- the presets ---------------------------------------------------------------------------------------------------


def _launch_dests() -> set[str]:
    return {a.dest for a in launch_command_parser()._actions}


@pytest.mark.parametrize("preset", PRESETS, ids=lambda p: p.name)
def test_accelerate_preset_loads_with_valid_values(preset):
    """accelerate's loader accepts the file (it rejects unknown top-level keys and a bad distributed_type); the
    values it does not check are checked here, and every nested key must be one `accelerate launch` reads -
    it ignores a misspelt one silently."""
    cfg = load_config_from_file(str(preset))
    assert isinstance(cfg, ClusterConfig)
    assert cfg.distributed_type in {DistributedType.MULTI_GPU, DistributedType.DEEPSPEED, DistributedType.FSDP}
    assert cfg.mixed_precision in {p.value for p in PrecisionType}, cfg.mixed_precision
    assert isinstance(cfg.num_processes, int) and cfg.num_processes >= 1 and cfg.num_machines == 1
    assert cfg.use_cpu is False and cfg.machine_rank == 0
    dests = _launch_dests()
    nested = [k for k in cfg.deepspeed_config] + [k if k.startswith("fsdp") else f"fsdp_{k}" for k in cfg.fsdp_config]
    assert nested or cfg.distributed_type == DistributedType.MULTI_GPU
    unknown = [k for k in nested if k not in dests]
    assert not unknown, f"{preset.name}: keys accelerate launch does not read: {unknown}"
    if cfg.distributed_type == DistributedType.DEEPSPEED:
        assert f"zero{cfg.deepspeed_config['zero_stage']}" == preset.stem
        assert cfg.deepspeed_config["offload_optimizer_device"] in {"none", "cpu", "nvme"}
    if cfg.distributed_type == DistributedType.FSDP:
        assert cfg.fsdp_config["fsdp_version"] == 2
    # the usage line at the top of the file names the file itself
    assert f"--config_file configs/accelerate/{preset.name}" in preset.read_text()


def test_the_readme_and_the_presets_agree():
    """Every preset the section names exists; the GPU values the section states are the presets' values; the CPU
    command overrides both of them (bf16 on CPU would change the loss curve the README promises)."""
    section = scale_out_section()
    named = set(re.findall(r"configs/accelerate/(\w+\.yaml)", section))
    assert named and named <= {p.name for p in PRESETS}, named
    for preset in PRESETS:
        cfg = load_config_from_file(str(preset))
        assert f"`num_processes: {cfg.num_processes}`" in section, preset.name
        assert f"`mixed_precision: {cfg.mixed_precision}`" in section, preset.name
    (accel,) = [c for c in readme_cpu_commands() if "accelerate launch" in c]
    args = shlex.split(accel)
    assert args[args.index("--num_processes") + 1] == "2" and args[args.index("--mixed_precision") + 1] == "no"
