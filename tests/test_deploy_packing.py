"""Packing formats: exact round trips, the documented bit layouts (checked against a plain-Python
encoder written from the format description), validation, and the fast LUT unpack."""

from __future__ import annotations

import pytest
import torch

from terdit.errors import TerditError
from terdit.quant.packing import (
    code_lut,
    disk_to_rows,
    pack_2bit,
    pack_base3,
    pack_codes,
    pack_rows,
    packed_shape,
    padding,
    rows_to_disk,
    unpack_2bit,
    unpack_base3,
    unpack_codes,
    unpack_rows,
    unpack_rows_into,
)


def random_codes(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, 2, (out, inp), generator=g, dtype=torch.int8)


def py_pack_2bit(codes: list[list[int]]) -> list[list[int]]:
    """The quarter layout by element: byte[r][j] = q[r] << 6 | q[R+r] << 4 | q[2R+r] << 2 | q[3R+r]."""
    out, inp = len(codes), len(codes[0])
    rows = -(-out // 4)
    q = [[c + 1 for c in row] for row in codes] + [[1] * inp for _ in range(4 * rows - out)]
    return [
        [
            (q[r][j] << 6) | (q[rows + r][j] << 4) | (q[2 * rows + r][j] << 2) | q[3 * rows + r][j]
            for j in range(inp)
        ]
        for r in range(rows)
    ]


def py_pack_base3(codes: list[list[int]]) -> list[list[int]]:
    """byte[r][b] = sum_i (code[r][5b+i] + 1) * 3**i, zero codes (digit 1) past the end of the row."""
    inp = len(codes[0])
    nb = -(-inp // 5)
    return [
        [sum(((row[5 * b + i] if 5 * b + i < inp else 0) + 1) * 3**i for i in range(5)) for b in range(nb)]
        for row in codes
    ]


@pytest.mark.parametrize("shape", [(8, 6), (7, 5), (5, 3), (1, 1), (12, 11)])
def test_2bit_layout_and_round_trip(shape):
    codes = random_codes(*shape)
    packed, pad = pack_2bit(codes)
    assert packed.dtype == torch.uint8 and tuple(packed.shape) == packed_shape("2bit", *shape)
    assert packed.tolist() == py_pack_2bit(codes.tolist())
    assert pad == padding("2bit", *shape) == 4 * packed.shape[0] - shape[0]
    assert torch.equal(unpack_2bit(packed, shape[0]), codes)


@pytest.mark.parametrize("shape", [(4, 10), (3, 7), (2, 1), (6, 16)])
def test_base3_layout_and_round_trip(shape):
    codes = random_codes(*shape, seed=1)
    packed, pad = pack_base3(codes)
    assert packed.tolist() == py_pack_base3(codes.tolist())
    assert int(packed.max()) <= 242
    assert pad == 5 * packed.shape[1] - shape[1]
    assert torch.equal(unpack_base3(packed, shape[1]), codes)
    assert torch.equal(unpack_codes(packed, "base3", shape), codes)


def test_all_byte_values_decode():
    """Every valid byte decodes to distinct digits and re-encodes to itself."""
    for fmt, valid in (("2bit", [b for b in range(256) if not (b & (b >> 1) & 0x55)]), ("base3", range(243))):
        k = 4 if fmt == "2bit" else 5
        packed = torch.tensor(list(valid), dtype=torch.uint8).view(-1, 1)
        codes = unpack_rows(packed, fmt, k)
        assert torch.equal(pack_rows(codes, fmt)[0], packed)
        assert len({tuple(r) for r in codes.tolist()}) == packed.shape[0]


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
def test_disk_rows_conversion_is_exact(fmt):
    codes = random_codes(12, 13, seed=2)
    disk, _ = pack_codes(codes, fmt)
    rows = disk_to_rows(disk, fmt, (12, 13))
    assert torch.equal(unpack_rows(rows, fmt, 13), codes)
    assert torch.equal(rows_to_disk(rows, fmt, (12, 13)), disk)


def test_2bit_code_3_is_rejected_by_name():
    packed, _ = pack_2bit(random_codes(8, 4))
    packed[1, 2] |= 0b00110000  # a field set to 3
    with pytest.raises(TerditError, match=r"layers\.0\.w.*code 3"):
        unpack_2bit(packed, 8, name="layers.0.w")


def test_base3_byte_over_242_is_rejected():
    packed, _ = pack_base3(random_codes(2, 10))
    packed[0, 0] = 243
    with pytest.raises(TerditError, match="blk.*exceed 242"):
        unpack_base3(packed, 10, name="blk")


def test_nonzero_padding_is_rejected():
    packed, pad = pack_2bit(random_codes(6, 3))  # 2 padded rows, both in the last quarter
    assert pad == 2
    packed[-1, 0] = (packed[-1, 0] & 0b11111100) | 2  # padding row set to +1
    with pytest.raises(TerditError, match="padding"):
        unpack_2bit(packed, 6, name="t")
    b3, _ = pack_base3(random_codes(1, 4))
    b3[0, 0] += 2 * 81  # digit 4 is padding in a 4-column row
    with pytest.raises(TerditError, match="padding"):
        unpack_base3(b3, 4, name="t")


def test_non_ternary_codes_and_bad_shapes_rejected():
    with pytest.raises(TerditError, match="not ternary"):
        pack_2bit(torch.tensor([[0, 2, 0, 0]]).T)
    with pytest.raises(TerditError, match="packed shape"):
        unpack_codes(torch.zeros(3, 4, dtype=torch.uint8), "2bit", (8, 4), name="w")
    with pytest.raises(TerditError, match="uint8"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), "2bit", (8, 4), name="w")


@pytest.mark.parametrize("fmt", ["2bit", "base3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lut_unpack_equals_alpha_times_codes(fmt, dtype):
    codes = random_codes(9, 14, seed=3)
    alpha = torch.tensor([-0.3719])
    rows, _ = pack_rows(codes, fmt)
    k = 4 if fmt == "2bit" else 5
    out = torch.empty(rows.numel() * k, dtype=dtype)
    unpack_rows_into(rows, code_lut(fmt, alpha, dtype), out, torch.empty(rows.numel() + 3, dtype=torch.int32))
    w = out.view(9, -1)[:, :14]
    expected = (alpha * codes.float()).to(dtype)  # the QAT model's alpha * codes, then cast
    assert w.dtype == dtype and torch.equal(w, expected)
