"""lowrank: low-rank decomposition of PyTorch models, with the APIs of Huawei AMCT and msModelSlim.

    model, changes = lowrank.auto_decomposition(model, "decompose_info.json")     # AMCT, in place
    model, changes = lowrank.decompose_network(model, "decompose_info.json")      # structure only
    model = lowrank.Decompose(model).from_ratio(0.5).decompose_network()           # msModelSlim

Pure PyTorch: importing it imports neither accelerate nor torch.distributed.
"""

__version__ = "0.1.0"

from .api import auto_decomposition, decompose_network
from .decomposer import Decompose
from .info import DecomposeInfoError
from .log import set_logger_level
from .stats import count_flops, count_parameters

__all__ = [
    "Decompose",
    "DecomposeInfoError",
    "auto_decomposition",
    "count_flops",
    "count_parameters",
    "decompose_network",
    "set_logger_level",
]
