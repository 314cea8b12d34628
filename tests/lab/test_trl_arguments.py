"""The TRL arguments every page shares: each TRL config takes them and keeps the lab's numbers."""

import pytest
import trl

from fieldguide.lab.training import TrainConfig
from fieldguide.lab.trl_arguments import trl_arguments

CONFIG = TrainConfig(max_steps=7, batch_size=3, learning_rate=2e-4, seed=5)


@pytest.mark.parametrize("config_class", [trl.SFTConfig, trl.DPOConfig, trl.RewardConfig, trl.GRPOConfig])
def test_every_trl_config_takes_them_and_keeps_the_labs_settings(config_class, tmp_path):
    extra = {"num_generations": 3} if config_class is trl.GRPOConfig else {}
    args = config_class(**trl_arguments(CONFIG, str(tmp_path)), **extra)
    assert (args.per_device_train_batch_size, args.max_steps, args.learning_rate, args.seed) == (
        3,
        7,
        2e-4,
        5,
    )
    assert args.report_to == [] or args.report_to in ("none", ["none"])
    assert args.save_strategy == "no" and args.disable_tqdm
