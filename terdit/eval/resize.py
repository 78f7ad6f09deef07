"""TensorFlow 1.x `resize_bilinear` (align_corners=False, half_pixel_centers=False), the resize that happens
inside ADM's Inception graph. It is *not* PyTorch's half-pixel bilinear: output pixel i samples the input at
i * (in / out) with no half-pixel shift and no antialiasing, so FID numbers stay comparable with ADM's."""

from __future__ import annotations

import torch


def _axis_weights(in_size: int, out_size: int, device: torch.device):
    """Lower/upper source indices and float32 interpolation weights along one axis, as TF computes them."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)  # TF: float(in) / out, held in float32
    src = torch.arange(out_size, dtype=torch.float32) * scale  # TF's legacy scaler: float(i) * scale
    floor = torch.floor(src)
    lower = floor.long().clamp(min=0)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    lerp = src - floor
    return lower.to(device), upper.to(device), lerp.to(device)


def tf1_resize_bilinear(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize NCHW float images to `size` exactly like TF1's ResizeBilinear, computed in float32."""
    if images.dim() != 4:
        raise ValueError(f"expected NCHW images, got shape {tuple(images.shape)}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    x = images.to(torch.float32)
    in_h, in_w = x.shape[-2:]
    if (in_h, in_w) == (out_h, out_w):
        return x
    y0, y1, wy = _axis_weights(in_h, out_h, x.device)
    x0, x1, wx = _axis_weights(in_w, out_w, x.device)
    rows_lo, rows_hi = x[:, :, y0, :], x[:, :, y1, :]
    top_l, top_r = rows_lo[..., x0], rows_lo[..., x1]
    bot_l, bot_r = rows_hi[..., x0], rows_hi[..., x1]
    # Same operation order as TF's kernel: lerp along x for both rows, then along y.
    top = top_l + (top_r - top_l) * wx
    bottom = bot_l + (bot_r - bot_l) * wx
    return top + (bottom - top) * wy[:, None]
