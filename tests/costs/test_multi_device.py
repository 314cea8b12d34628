"""Training on several processes: DDP and FSDP under torchrun, and the same script under
accelerate launch, take the single-process run's steps (its gradients, its weights, its
losses); the per-rank mean, the common mistake, does not; FSDP halves what a rank holds."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fieldguide.costs import multi_device
from fieldguide.costs.multi_device import global_batches, main

CONFIGS = Path(multi_device.__file__).parent / "accelerate_configs"
# Seed 3's first global batch gives the two ranks 6 and 8 targets: unequal counts, which the
# per-rank mean gets wrong (at seed 0 they happen to be equal).
ARGS = ["--steps", "3", "--global-batch", "4", "--seed", "3"]
# --standalone: torchrun finds a free port for the two processes to meet on.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def launch(launcher: list[str], folder: Path, *extra: str) -> dict:
    """Run the script under ``launcher``: rank 0's saved weights and first gradients, and the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on two cores: one thread each
    files = [
        "--output",
        str(folder / "lora.safetensors"),
        "--first-gradient",
        str(folder / "grad.safetensors"),
    ]
    done = subprocess.run(
        [*launcher, "-m", "fieldguide.costs.multi_device", *ARGS, *files, *extra],
        check=False,  # a failure is reported below, with the processes' own error
        capture_output=True,
        text=True,
        env=env,
        timeout=120,  # a run takes seconds: a rank left waiting on a peer fails, not hangs
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return {
        "weights": load_file(folder / "lora.safetensors"),
        "gradients": load_file(folder / "grad.safetensors"),
        "out": done.stdout,
    }


def relative_difference(ours: dict, reference: dict) -> float:
    assert ours.keys() == reference.keys() and len(ours) > 0
    return max((ours[name] - reference[name]).abs().max().item() for name in ours) / max(
        reference[name].abs().max().item() for name in reference
    )


def losses(out: str) -> list[str]:
    return re.findall(r"loss (\S+)", out)


def ranks(out: str) -> dict[int, tuple[int, int]]:
    """Each rank's line: the parameter bytes it holds, and the whole model's."""
    found = re.findall(r"rank (\d) of 2: holds ([\d,]+) of the model's ([\d,]+)", out)
    return {int(r): (int(local.replace(",", "")), int(whole.replace(",", ""))) for r, local, whole in found}


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory):
    """Each launch once: the single process, DDP and FSDP on two, DDP with the per-rank mean."""
    folder = tmp_path_factory.mktemp
    return {
        "single": launch([sys.executable], folder("single")),
        "ddp": launch(TORCHRUN, folder("ddp"), "--strategy", "ddp"),
        "fsdp": launch(TORCHRUN, folder("fsdp"), "--strategy", "fsdp"),
        "local": launch(TORCHRUN, folder("local"), "--strategy", "ddp", "--normalise", "local"),
    }


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_take_the_single_process_steps(strategy, runs):
    ours, single = runs[strategy], runs["single"]
    # The first step's gradient, averaged over the ranks, is the one-process gradient: a check
    # that AdamW's updates, blind to a gradient's scale, could not make.
    assert relative_difference(ours["gradients"], single["gradients"]) < 1e-6
    worst = max((ours["weights"][name] - w).abs().max().item() for name, w in single["weights"].items())
    assert worst < 1e-5, worst  # after 3 steps at a rate of 1e-3
    assert losses(ours["out"]) == losses(single["out"])  # the global mean loss, every step


def test_each_rank_dividing_by_its_own_count_takes_another_step(runs):
    # The control: the per-rank mean weighs the two ranks' targets differently.
    assert relative_difference(runs["local"]["gradients"], runs["single"]["gradients"]) > 1e-2


def test_ddp_gives_every_rank_the_model_and_fsdp_half_of_it(runs):
    for local, whole in ranks(runs["ddp"]["out"]).values():
        assert local == whole
    held = ranks(runs["fsdp"]["out"])
    assert held.keys() == {0, 1}
    for local, whole in held.values():  # every first dimension of the tiny model is even
        assert local * 2 == whole, (local, whole)


def test_accelerate_launch_runs_the_same_script_on_two_processes(runs, tmp_path):
    with socket.socket() as probe:  # a free port for the ranks to meet on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = ["--config_file", str(CONFIGS / "multi-gpu.yaml"), "--main_process_port", str(port)]
    ours = launch([sys.executable, "-m", "accelerate.commands.launch", *config], tmp_path, "--device", "cpu")
    assert ranks(ours["out"]).keys() == {0, 1}  # two processes, not one that ran alone
    assert relative_difference(ours["gradients"], runs["single"]["gradients"]) < 1e-6


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_accelerate_config_is_one_accelerate_reads(config):
    from accelerate.commands.config.config_args import load_config_from_file

    loaded = load_config_from_file(str(config))
    assert loaded.distributed_type.value == yaml.safe_load(config.read_text())["distributed_type"]


def test_every_rank_draws_the_same_batches_and_takes_its_own_share():
    batches = global_batches(list(range(10)), global_batch=4, steps=5, seed=0)
    assert batches == global_batches(list(range(10)), global_batch=4, steps=5, seed=0)
    drawn = [x for batch in batches for x in batch]
    assert sorted(drawn[:10]) == list(range(10))  # a whole pass before any example comes back
    shares = [batches[0][rank::2] for rank in range(2)]
    assert sorted(shares[0] + shares[1]) == sorted(batches[0])


def test_a_global_batch_that_does_not_split_is_refused(monkeypatch, capsys):
    monkeypatch.setattr(
        multi_device, "join_process_group", lambda device: multi_device.Rank(0, 3, torch.device("cpu"))
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--global-batch", "4"])
    assert exit_info.value.code == 2
    assert "does not split over 3 ranks" in capsys.readouterr().err


def test_an_output_in_a_missing_folder_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["--output", str(tmp_path / "missing" / "lora.safetensors")])
    assert "argument --output: the folder" in capsys.readouterr().err
