"""Deployment: packed ternary checkpoints, packed inference, public checkpoints, benchmarks.

pack_                       swap the ternary linears of any module tree for PackedLinear, in place
export_model / export_run   a model or training run -> deploy directory (2bit | base3 packed)
write_deploy_dir            the one deploy writer (export, convert, save_pretrained of a packed model)
load_deployed               deploy or public release directory -> TerDiT with packed layers, `.deploy` facts
convert_release             public release directory -> deploy directory
map_labels                  ImageNet ids -> the class indices a loaded model expects
"""

from terdit.deploy.convert import convert_release
from terdit.deploy.export import export_model, export_run, write_deploy_dir
from terdit.deploy.format import DeployInfo, read_config
from terdit.deploy.kernels import find_kernel, register_kernel
from terdit.deploy.labels import lexicographic_permutation, map_labels
from terdit.deploy.loader import load_deployed
from terdit.deploy.packed_linear import PackedLinear, compile_int8_, pack_, set_policy

__all__ = [
    "DeployInfo",
    "PackedLinear",
    "compile_int8_",
    "convert_release",
    "export_model",
    "export_run",
    "find_kernel",
    "lexicographic_permutation",
    "load_deployed",
    "map_labels",
    "pack_",
    "read_config",
    "register_kernel",
    "set_policy",
    "write_deploy_dir",
]
