"""The 2015-12-05 Inception-v3 graph that ADM's evaluator runs (the "FID Inception"), in plain PyTorch.

It differs from torchvision's Inception-v3 in ways that change FID: 1008 output classes, average pools that
ignore padding (TF's SAME pooling), a max pool in the last block's pool branch, and TF1 bilinear resizing of
the input to 299x299 followed by (x - 128) / 128. Module names follow the pytorch-fid / torch-fidelity
state-dict layout so their converted weight files load directly.

Outputs per image, matching the TF graph tensors ADM reads:
  pool    `pool_3:0`, 2048 values (FID, precision/recall)
  spatial `mixed_6/conv:0` = Mixed_6d's 1x1 branch after ReLU, first 7 channels, flattened in TF's
          (height, width, channel) order: 17 * 17 * 7 = 2023 values (sFID)
  logits  pool @ fc.weight.T, no bias, 1008 classes (Inception Score)
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from terdit.errors import TerditError
from terdit.eval.resize import tf1_resize_bilinear

WEIGHTS_ENV = "TERDIT_INCEPTION_WEIGHTS"
WEIGHTS_FLAG = "--inception-weights"
WEIGHTS_HELP = (
    "the 2015-12-05 FID Inception weights as a PyTorch state dict: pytorch-fid's "
    "pt_inception-2015-12-05-6726825d.pth (github.com/mseitzer/pytorch-fid/releases/download/fid_weights/) "
    "or torch-fidelity's weights-inception-2015-12-05-6726825d.pth "
    "(github.com/toshas/torch-fidelity/releases/download/v0.2.0/)"
)
INPUT_SIZE = 299
POOL_DIM, SPATIAL_DIM, NUM_LOGITS = 2048, 17 * 17 * 7, 1008
SPATIAL_CHANNELS = 7


class ConvBN(nn.Module):
    """Convolution without bias, batch norm (TF's epsilon 0.001), ReLU: the graph's basic unit."""

    def __init__(self, cin: int, cout: int, kernel, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg3(x: torch.Tensor) -> torch.Tensor:
    """3x3 stride-1 average pool that divides by the number of real (unpadded) pixels, as TF does."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """35x35 block (mixed, mixed_1, mixed_2): 1x1, 5x5, double 3x3 and pooled branches."""

    def __init__(self, cin: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 64, 1)
        self.branch5x5_1 = ConvBN(cin, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(cin, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class BlockB(nn.Module):
    """Grid reduction 35x35 -> 17x17 (mixed_3)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3 = ConvBN(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (mixed_4 .. mixed_7). `branch1x1` of the third one
    (Mixed_6d, TF `mixed_6`) is the `mixed_6/conv` tensor used by sFID."""

    def __init__(self, cin: int, c7: int) -> None:
        super().__init__()
        self.branch1x1 = ConvBN(cin, 192, 1)
        self.branch7x7_1 = ConvBN(cin, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class BlockD(nn.Module):
    """Grid reduction 17x17 -> 8x8 (mixed_8)."""

    def __init__(self, cin: int) -> None:
        super().__init__()
        self.branch3x3_1 = ConvBN(cin, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(cin, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = x
        for layer in (self.branch7x7x3_1, self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b = layer(b)
        return torch.cat([a, b, F.max_pool2d(x, 3, stride=2)], 1)


class BlockE(nn.Module):
    """8x8 block with split 1x3/3x1 outputs (mixed_9, mixed_10). The 2015 graph's last block pools its
    pool branch with a 3x3 *max* pool instead of an average pool (`max_pool=True`)."""

    def __init__(self, cin: int, max_pool: bool) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(cin, 320, 1)
        self.branch3x3_1 = ConvBN(cin, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(cin, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.branch1x1(x)
        s = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(s), self.branch3x3_2b(s)], 1)
        t = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(t), self.branch3x3dbl_3b(t)], 1)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([a, b, c, self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """The FID Inception network. forward() takes float NCHW images with values in 0..255 at any size and
    returns (pool, spatial, logits) as described in the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, 32)
        self.Mixed_5c = BlockA(256, 64)
        self.Mixed_5d = BlockA(288, 64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, 128)
        self.Mixed_6c = BlockC(768, 160)
        self.Mixed_6d = BlockC(768, 160)
        self.Mixed_6e = BlockC(768, 192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280, max_pool=False)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = tf1_resize_bilinear(images, INPUT_SIZE)
        x = (x - 128) / 128
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        tap: list[torch.Tensor] = []
        hook = self.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, out: tap.append(out))
        try:
            for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b,
                          self.Mixed_6c, self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b,
                          self.Mixed_7c):
                x = block(x)
        finally:
            hook.remove()
        pool = x.mean(dim=(2, 3))  # TF's pool_3: 8x8 VALID average pool
        spatial = spatial_features(tap[0])
        logits = pool @ self.fc.weight.T  # ADM's IS uses the logits without the bias
        return pool, spatial, logits


def spatial_features(mixed_6_conv: torch.Tensor) -> torch.Tensor:
    """First 7 channels of an NCHW map, flattened in TF's NHWC order: channel fastest, then width, height."""
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(mixed_6_conv.shape[0], -1)


def _normalise_state_dict(raw: object, path: Path) -> dict[str, torch.Tensor]:
    """Map pytorch-fid / torch-fidelity key layouts (optionally wrapped or DataParallel-prefixed) to ours."""
    if isinstance(raw, dict) and "state_dict" in raw and isinstance(raw["state_dict"], dict):
        raw = raw["state_dict"]
    if not isinstance(raw, dict) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise TerditError(f"{path}: not a state dict of tensors; expected {WEIGHTS_HELP}")
    out = {}
    for key, value in raw.items():
        for prefix in ("module.", "model.", "inception."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith("num_batches_tracked") or key.startswith("AuxLogits."):
            continue  # training-only buffers / the auxiliary head: not part of the FID graph
        out[key] = value
    return out


def load_inception(weights: str | Path | None = None, device: str | torch.device = "cpu") -> FIDInception:
    """Build the network with the 2015-12-05 weights from `weights`, else from $TERDIT_INCEPTION_WEIGHTS."""
    if weights is None:
        weights = os.environ.get(WEIGHTS_ENV)
    if not weights:
        raise TerditError(f"Inception weights are needed for these metrics: pass {WEIGHTS_FLAG} PATH or set "
                          f"{WEIGHTS_ENV}, where PATH is {WEIGHTS_HELP}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise TerditError(f"{path}: Inception weights file not found ({WEIGHTS_FLAG} / {WEIGHTS_ENV}); "
                          f"download {WEIGHTS_HELP}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable or foreign file is the user's input error
        raise TerditError(f"{path}: cannot read Inception weights ({type(e).__name__}: {e}); "
                          f"expected {WEIGHTS_HELP}") from e
    state = _normalise_state_dict(raw, path)
    with torch.device("meta"):  # no point initialising 24M parameters that are overwritten next
        net = FIDInception()
    expected = net.state_dict()
    counters = [k for k in expected if k.endswith("num_batches_tracked")]
    missing = [k for k in expected if k not in state and k not in counters]
    bad = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or bad:
        detail = f"missing {missing[:3]}" if missing else f"wrong shapes for {bad[:3]}"
        raise TerditError(f"{path}: not the FID Inception weights ({detail}); expected {WEIGHTS_HELP}")
    full = {k: torch.zeros((), dtype=torch.long) if k in counters else state[k].float() for k in expected}
    net.load_state_dict(full, assign=True)
    return prepare(net, device)


def prepare(net: FIDInception, device: str | torch.device = "cpu") -> FIDInception:
    """Eval mode (BatchNorm must use its running statistics) and no gradients, on `device`."""
    net.eval().requires_grad_(False)
    return net.to(device)


class InceptionExtractor:
    """Feature extractor for ADM's metrics: uint8 NHWC RGB batches in, numpy features out."""

    name = "inception"
    has_spatial = True

    def __init__(self, net: FIDInception, device: str | torch.device = "cpu") -> None:
        self.net = prepare(net, device)
        self.device = torch.device(device)

    @classmethod
    def from_weights(cls, weights: str | Path | None = None, device: str | torch.device = "cpu"):
        return cls(load_inception(weights, device), device)

    def check_images(self, shape: tuple[int, ...], source: str) -> None:
        """ADM's graph takes 3-channel images of any size; anything else is an input error."""
        if len(shape) != 4 or shape[-1] != 3:
            raise TerditError(f"{source}: Inception features need RGB images of shape (N, H, W, 3), got "
                              f"{tuple(shape)}; for 8x8 one-channel digits use --features digits")

    @torch.no_grad()
    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        x = x.permute(0, 3, 1, 2).float().contiguous()  # ADM: each uint8 batch as float32 0..255; dense NCHW
        pool, spatial, logits = self.net(x)
        return {"pool": pool.cpu().numpy(), "spatial": spatial.cpu().numpy(), "logits": logits.cpu().numpy()}
