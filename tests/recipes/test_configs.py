"""Every Accelerate config in recipes/configs/ is valid for Accelerate and says how to use it."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig
from accelerate.utils import DistributedType

from tests.conftest import CONFIGS

CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))


def test_the_configs_the_recipes_name_exist():
    names = {path.name for path in CONFIG_FILES}
    assert {"cpu_2proc.yaml", "gpu_8proc.yaml", "multi_node.yaml", "deepspeed_zero2.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda path: path.name)
def test_config_is_valid_and_names_its_command(path: Path):
    text = path.read_text()
    assert text.startswith("# Accelerate config"), "the header says what the file is for"
    assert f"accelerate launch --config_file recipes/configs/{path.name}" in text, "the header gives its command"
    config = ClusterConfig.from_yaml_file(str(path))  # Accelerate's own loader: unknown keys, bad values
    assert config.num_processes >= config.num_machines >= 1 and 0 <= config.machine_rank < config.num_machines
    assert config.mixed_precision in ("no", "fp16", "bf16")
    if config.distributed_type == DistributedType.DEEPSPEED:
        assert config.deepspeed_config["zero_stage"] in (2, 3) and config.num_processes == 2
    else:
        assert config.distributed_type == DistributedType.MULTI_GPU, "MULTI_GPU launches torch.distributed.run"
    if config.num_machines > 1:
        assert config.num_processes % config.num_machines == 0 and not config.same_network
