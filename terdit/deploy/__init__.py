"""Deployment: packed ternary checkpoints, packed inference, public checkpoints, benchmarks.

export_model / export_run   a model or training run -> deploy directory (2bit | base3 packed)
load_deployed               deploy or public release directory -> TerDiT with packed layers
convert_release             public release directory -> deploy directory
map_labels                  ImageNet ids -> the class indices a loaded model expects
"""

from terdit.deploy.convert import convert_release
from terdit.deploy.export import export_model, export_run
from terdit.deploy.format import DeployInfo, read_config
from terdit.deploy.kernels import find_kernel, register_kernel
from terdit.deploy.labels import lexicographic_permutation, map_labels
from terdit.deploy.loader import load_deployed
from terdit.deploy.packed_linear import PackedLinear, set_policy

__all__ = [
    "DeployInfo",
    "PackedLinear",
    "convert_release",
    "export_model",
    "export_run",
    "find_kernel",
    "lexicographic_permutation",
    "load_deployed",
    "map_labels",
    "read_config",
    "register_kernel",
    "set_policy",
]
