"""The settings every page's TRL trainer shares, so that TRL runs what the lab's loop runs.

Each page builds TRL's trainer for its technique beside its own from-scratch code; the
arguments that say *how* to train (the batch, the steps, the rate, the seed) come from the
same ``TrainConfig``, and the ones that keep a run quiet and local are the same everywhere.
"""

import sys

import torch

from fieldguide.lab.training import TrainConfig


def trl_arguments(config: TrainConfig, output_dir: str) -> dict:
    """Keyword arguments for any TRL ``*Config``: ``config``'s batch, steps, rate and seed; on
    the CPU unless a GPU is there; no logging service, no checkpoints, no progress bars."""
    quiet_datasets()
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": config.batch_size,
        "max_steps": config.max_steps,
        "learning_rate": config.learning_rate,
        "seed": config.seed,
        "use_cpu": not torch.cuda.is_available(),
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
        # TRL turns activation checkpointing on by default; the lab's models have no need of it.
        "gradient_checkpointing": None,
        "activation_checkpointing": False,
    }


def quiet_datasets() -> None:
    """TRL maps its data set with progress bars: keep them out of logs (not out of a terminal)."""
    from datasets.utils.logging import disable_progress_bar  # imported here: only TRL needs it

    if not sys.stderr.isatty():
        disable_progress_bar()
