"""Byte formats for ternary codes: exact, reversible, validated.

On-disk formats (`FORMATS`), for codes w in {-1, 0, +1} of a weight [out, in], with q = w + 1 in {0, 1, 2}:

- "2bit": the TerDiT / HQQ public layout, 4 codes per byte. The output rows are split into 4 contiguous
  quarters of R = ceil(out / 4) rows; byte [r, j] = q[r, j] << 6 | q[R+r, j] << 4 | q[2R+r, j] << 2 |
  q[3R+r, j]. Shape [R, in]. When out % 4 != 0 the rows are padded at the end with zero weights (q = 1);
  the number of padded rows is returned by the packer and checked by the unpacker.
- "base3": 5 codes per byte along each row, byte [r, b] = sum_i q[r, 5b+i] * 3**i <= 242 (1.6 bits per
  weight). Shape [out, ceil(in / 5)]; the last byte of a row is padded with zero weights when in % 5 != 0.

In memory, packed layers use the *rows* layout: each byte holds k consecutive codes of one row as the
digits of radix 4 (2bit, k = 4) or radix 3 (base3, k = 5; identical to the on-disk base3 layout). One
256-entry table then maps a byte to k adjacent weights, so unpacking a layer is a single gather
(`unpack_rows_into`). The quarter layout needs four strided passes instead; it is converted once at load.
"""

from __future__ import annotations

import math

import torch

from terdit.errors import TerditError

FORMATS: tuple[str, ...] = ("2bit", "base3")
RADIX = {"2bit": 4, "base3": 3}
DIGITS = {"2bit": 4, "base3": 5}  # codes per byte
BITS_PER_WEIGHT = {"2bit": 2.0, "base3": 1.6}
MAX_BASE3_BYTE = 3**5 - 1  # 242


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise TerditError(f"unknown packing format {fmt!r}; choose from {', '.join(FORMATS)}")


def check_codes(codes: torch.Tensor, name: str = "tensor") -> None:
    """Raise unless `codes` is a 2-D tensor of values in {-1, 0, 1}."""
    if codes.dim() != 2:
        raise TerditError(f"{name}: ternary codes must be 2-D [out, in], got shape {tuple(codes.shape)}")
    bad = (codes != 0) & (codes != 1) & (codes != -1)
    if bool(bad.any()):
        raise TerditError(f"{name}: {int(bad.sum())} values are not ternary codes in {{-1, 0, 1}}")


def packed_shape(fmt: str, out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the on-disk packed tensor for a weight [out, in]."""
    _check_format(fmt)
    if fmt == "2bit":
        return math.ceil(out_features / 4), in_features
    return out_features, math.ceil(in_features / 5)


def rows_shape(fmt: str, out_features: int, in_features: int) -> tuple[int, int]:
    """Shape of the in-memory rows layout for a weight [out, in]."""
    _check_format(fmt)
    return out_features, math.ceil(in_features / DIGITS[fmt])


def padding(fmt: str, out_features: int, in_features: int) -> int:
    """Zero codes added by the on-disk format: padded rows (2bit) or padded columns per row (base3)."""
    r, c = packed_shape(fmt, out_features, in_features)
    return 4 * r - out_features if fmt == "2bit" else 5 * c - in_features


# --- the public 2bit quarter layout -------------------------------------------------------------------


def pack_2bit(codes: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, int]:
    """Ternary codes [out, in] -> (uint8 [ceil(out/4), in] in the quarter layout, padded rows)."""
    check_codes(codes, name)
    out_features, in_features = codes.shape
    rows, _ = packed_shape("2bit", out_features, in_features)
    pad = 4 * rows - out_features
    q = torch.ones(4 * rows, in_features, dtype=torch.uint8, device=codes.device)
    q[:out_features] = (codes + 1).to(torch.uint8)
    q = q.view(4, rows, in_features)
    packed = (q[0] << 6) | (q[1] << 4) | (q[2] << 2) | q[3]
    return packed.contiguous(), pad


def check_2bit(packed: torch.Tensor, name: str = "tensor") -> None:
    """Raise if any 2-bit field holds the unused code 3 (both bits of a field set)."""
    _check_uint8(packed, name)
    bad = packed & (packed >> 1) & 0x55
    if bool(bad.any()):
        n = int((bad != 0).sum())
        raise TerditError(f"{name}: {n} bytes hold the 2-bit code 3, which is not a ternary value (corrupt file?)")


def unpack_2bit(packed: torch.Tensor, out_features: int, name: str = "tensor") -> torch.Tensor:
    """uint8 [R, in] quarter layout -> int8 codes [out, in]; validates codes and padding."""
    check_2bit(packed, name)
    rows, in_features = packed.shape
    if not 4 * rows - 4 < out_features <= 4 * rows:
        raise TerditError(f"{name}: packed rows {rows} do not hold {out_features} output rows (2bit)")
    q = torch.stack([(packed >> s) & 3 for s in (6, 4, 2, 0)]).view(4 * rows, in_features)
    if bool((q[out_features:] != 1).any()):
        raise TerditError(f"{name}: padding rows beyond row {out_features} are not zero")
    return q[:out_features].to(torch.int8) - 1


# --- rows layouts (base3 on disk; radix-4 rows for 2bit in memory) ----------------------------------


def pack_rows(codes: torch.Tensor, fmt: str, name: str = "tensor") -> tuple[torch.Tensor, int]:
    """Ternary codes [out, in] -> (uint8 [out, ceil(in/k)], padded columns); digit i has weight radix**i."""
    _check_format(fmt)
    check_codes(codes, name)
    radix, k = RADIX[fmt], DIGITS[fmt]
    out_features, in_features = codes.shape
    _, nbytes = rows_shape(fmt, out_features, in_features)
    q = torch.ones(out_features, nbytes * k, dtype=torch.uint8, device=codes.device)
    q[:, :in_features] = (codes + 1).to(torch.uint8)
    q = q.view(out_features, nbytes, k)
    packed = q[..., k - 1].clone()
    for i in range(k - 2, -1, -1):  # Horner: values stay <= 255 in uint8
        packed.mul_(radix).add_(q[..., i])
    return packed, nbytes * k - in_features


def pack_base3(codes: torch.Tensor, name: str = "tensor") -> tuple[torch.Tensor, int]:
    """Ternary codes [out, in] -> (uint8 [out, ceil(in/5)], padded columns per row)."""
    return pack_rows(codes, "base3", name)


def check_rows(packed: torch.Tensor, fmt: str, name: str = "tensor") -> None:
    """Raise on bytes that do not decode to k ternary digits."""
    _check_uint8(packed, name)
    if fmt == "base3":
        bad = packed > MAX_BASE3_BYTE
        if bool(bad.any()):
            raise TerditError(f"{name}: {int(bad.sum())} bytes exceed {MAX_BASE3_BYTE}, not base-3 packed codes")
    else:
        check_2bit(packed, name)  # radix-4 digits are 2-bit fields


def _digits(fmt: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """[256, k] int table: the k digits (least significant first) of every byte value."""
    radix, k = RADIX[fmt], DIGITS[fmt]
    b = torch.arange(256, device=device)
    return torch.stack([(b // radix**i) % radix for i in range(k)], dim=1)


def unpack_rows(packed: torch.Tensor, fmt: str, in_features: int, name: str = "tensor") -> torch.Tensor:
    """Rows layout uint8 [out, nbytes] -> int8 codes [out, in]; validates bytes and padding."""
    _check_format(fmt)
    check_rows(packed, fmt, name)
    out_features, nbytes = packed.shape
    k = DIGITS[fmt]
    if not nbytes * k - k < in_features <= nbytes * k:
        raise TerditError(f"{name}: {nbytes} bytes per row do not hold {in_features} columns ({fmt})")
    q = _digits(fmt, packed.device)[packed.long()].view(out_features, nbytes * k)
    if bool((q[:, in_features:] != 1).any()):
        raise TerditError(f"{name}: padding columns beyond column {in_features} are not zero")
    return q[:, :in_features].to(torch.int8) - 1


def unpack_base3(packed: torch.Tensor, in_features: int, name: str = "tensor") -> torch.Tensor:
    return unpack_rows(packed, "base3", in_features, name)


# --- format dispatch ---------------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, fmt: str, name: str = "tensor") -> tuple[torch.Tensor, int]:
    """Codes -> (on-disk packed uint8, padding) in format `fmt`."""
    _check_format(fmt)
    return pack_2bit(codes, name) if fmt == "2bit" else pack_base3(codes, name)


def unpack_codes(packed: torch.Tensor, fmt: str, shape: tuple[int, int], name: str = "tensor") -> torch.Tensor:
    """On-disk packed uint8 -> int8 codes of `shape` [out, in]; validates everything it reads."""
    _check_format(fmt)
    check_packed_shape(packed, fmt, shape, name)
    if fmt == "2bit":
        return unpack_2bit(packed, shape[0], name)
    return unpack_base3(packed, shape[1], name)


def check_packed_shape(packed: torch.Tensor, fmt: str, shape: tuple[int, int], name: str = "tensor") -> None:
    _check_uint8(packed, name)
    want = packed_shape(fmt, *shape)
    if tuple(packed.shape) != want:
        raise TerditError(
            f"{name}: packed shape {tuple(packed.shape)} does not match weight {tuple(shape)} in {fmt} "
            f"(expected {want})"
        )


def disk_to_rows(packed: torch.Tensor, fmt: str, shape: tuple[int, int], name: str = "tensor") -> torch.Tensor:
    """On-disk packed tensor -> validated in-memory rows layout (a no-copy check for base3)."""
    check_packed_shape(packed, fmt, shape, name)
    if fmt == "base3":
        unpack_rows(packed, fmt, shape[1], name)  # validates values and padding
        return packed
    return quarters_to_rows(packed, shape[0], name)


def quarters_to_rows(packed: torch.Tensor, out_features: int, name: str = "tensor") -> torch.Tensor:
    """2bit quarter layout -> 2bit rows layout, byte to byte (no int8 codes in between): the load-time
    conversion of released checkpoints, a few passes over the bytes. Validates codes and padding."""
    check_2bit(packed, name)
    rows, in_features = packed.shape
    if not 4 * rows - 4 < out_features <= 4 * rows:
        raise TerditError(f"{name}: packed rows {rows} do not hold {out_features} output rows (2bit)")
    fields = torch.tensor([[(b >> s) & 3 for s in (6, 4, 2, 0)] for b in range(256)], dtype=torch.uint8)
    q = torch.index_select(fields.to(packed.device), 0, packed.reshape(-1).to(torch.int32))  # [R*in, 4]
    q = q.view(rows, in_features, 4).permute(2, 0, 1).reshape(4 * rows, in_features)  # q[row, col]
    if bool((q[out_features:] != 1).any()):
        raise TerditError(f"{name}: padding rows beyond row {out_features} are not zero")
    nbytes = -(-in_features // 4)
    q = q[:out_features]
    if nbytes * 4 != in_features:
        q = torch.nn.functional.pad(q, (0, nbytes * 4 - in_features), value=1)
    q = q.reshape(out_features, nbytes, 4)
    out = q[..., 3].clone()
    for i in (2, 1, 0):  # Horner in radix 4, within uint8
        out.mul_(4).add_(q[..., i])
    return out


def rows_to_disk(packed_rows: torch.Tensor, fmt: str, shape: tuple[int, int], name: str = "tensor") -> torch.Tensor:
    """In-memory rows layout -> on-disk packed tensor."""
    codes = unpack_rows(packed_rows, fmt, shape[1], name)
    return pack_codes(codes, fmt, name)[0]


# --- fast unpack to floats ---------------------------------------------------------------------------

_BASE_LUTS: dict[tuple[str, torch.device], torch.Tensor] = {}


def code_lut(fmt: str, alpha: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[256, k] table byte -> k weights alpha * code, in `dtype` on alpha's device.

    Computed as (alpha * code) in fp32 and then cast, which equals casting alpha first for codes in
    {-1, 0, 1}: the deployed weights are bit-identical to the QAT model's alpha * codes.
    """
    key = (fmt, alpha.device)
    base = _BASE_LUTS.get(key)
    if base is None:
        base = _BASE_LUTS[key] = (_digits(fmt, alpha.device) - 1).to(torch.float32)
    return (base * alpha.to(torch.float32)).to(dtype)


def unpack_rows_into(
    packed_rows: torch.Tensor, lut: torch.Tensor, out: torch.Tensor, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Gather lut[byte] for every byte into `out` (contiguous, [out, nbytes * k]); one pass, no temporaries.

    `packed_rows` may be a strided view (a block of byte columns). `index` is an optional int32 scratch of
    at least packed_rows.numel() elements (the gather needs int indices).
    """
    if index is None:
        idx = packed_rows.to(torch.int32)
    else:
        idx = index[: packed_rows.numel()].view(packed_rows.shape)
        idx.copy_(packed_rows)
    torch.index_select(lut, 0, idx.view(-1), out=out.view(-1, lut.shape[1]))
    return out


def _check_uint8(packed: torch.Tensor, name: str) -> None:
    if packed.dtype != torch.uint8:
        raise TerditError(f"{name}: packed weights must be uint8, got {packed.dtype}")
    if packed.dim() != 2:
        raise TerditError(f"{name}: packed weights must be 2-D, got shape {tuple(packed.shape)}")
