"""pack / unpack: exact round trips on awkward shapes for every bits, the bit layout checked byte
by byte against an independent bit-string reference, the seeds' 228 example, and bad input."""

import re

import pytest
import torch

import linquant as lq
from reference import column_major, ref_unpack, strided_view

ALL_BITS = list(range(1, 9))
SHAPES = [(1,), (3,), (8,), (9,), (4, 7), (2, 3, 33), (5, 64), (1, 257), (0,), (0, 6), (3, 0), (2, 1, 1)]


def ref_pack(q, bits):
    """Bit-string reference: each row's values written LSB-first into a list of bits, cut into bytes."""
    n = q.shape[-1]
    nbytes = (n * bits + 7) // 8
    out = []
    for row in q.reshape(-1, n).tolist():
        stream = [(v >> k) & 1 for v in row for k in range(bits)]
        stream += [0] * (nbytes * 8 - len(stream))
        out.append([sum(stream[8 * i + k] << k for k in range(8)) for i in range(nbytes)])
    return torch.tensor(out, dtype=torch.uint8).reshape(list(q.shape[:-1]) + [nbytes])


def test_seed_example_228():
    assert lq.pack(torch.tensor([0, 1, 2, 3], dtype=torch.uint8), 2).tolist() == [228]
    assert lq.pack(torch.tensor([1, 2, 3, 0, 3, 3]), 2).tolist() == [57, 15]  # int64 input in range
    assert lq.unpack(torch.tensor([228], dtype=torch.uint8), 2, 4).tolist() == [0, 1, 2, 3]
    assert lq.pack(torch.tensor([0x3, 0xA], dtype=torch.uint8), 4).tolist() == [0xA3]


@pytest.mark.parametrize("bits", ALL_BITS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_and_layout(bits, shape, gen):
    q = torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.uint8)
    p = lq.pack(q, bits)
    assert p.dtype == torch.uint8 and p.shape == tuple(list(shape[:-1]) + [(shape[-1] * bits + 7) // 8])
    if q.numel():
        assert torch.equal(p, ref_pack(q, bits))
    assert torch.equal(lq.unpack(p, bits, shape[-1]), q)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_long_rows_split_across_threads(bits, gen):
    # Rows longer than the kernels' 64K-value pieces, with a length that is not a multiple of 8.
    q = torch.randint(0, 2**bits, (2, 200003), generator=gen, dtype=torch.uint8)
    p = lq.pack(q, bits)
    assert torch.equal(lq.unpack(p, bits, 200003), q)
    # Byte-exact against the reference across the first piece boundary (value 65536) and at the
    # row's end; slices start at multiples of 8 values, so they start on byte boundaries.
    for start in (65528, 199936):
        stop = min(start + 80, 200003)
        ref = ref_pack(q[:, start:stop], bits)
        assert torch.equal(p[:, start * bits // 8: start * bits // 8 + ref.shape[-1]], ref)


# uint16/32/64 too: ATen has no min / max for them, which the range check took (it failed with
# `"min_all" not implemented for 'UInt16'`).
@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                                   torch.uint64])
def test_other_integer_dtypes(dtype, gen):
    q = torch.randint(0, 16, (5, 13), generator=gen).to(dtype)
    assert torch.equal(lq.pack(q, 4), lq.pack(q.to(torch.uint8), 4))


def test_non_contiguous(gen):
    q = torch.randint(0, 4, (30, 41), generator=gen, dtype=torch.uint8)
    for view in (q.t(), q[:, ::3], q[::2, 1:]):
        assert torch.equal(lq.unpack(lq.pack(view, 2), 2, view.shape[-1]), view)
        assert torch.equal(lq.pack(view, 2), ref_pack(view.contiguous(), 2))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_unpack_non_contiguous(bits, gen):
    # packed as views with other strides (slices of a wider tensor, at offsets 0 and 1, a row
    # step, a column step, column-major) against the bit-string reference. Random bytes: the
    # last byte's padding bits are not values, whatever they hold.
    size = 37
    wide = torch.randint(0, 256, (12, (size * bits + 7) // 8 + 1), generator=gen, dtype=torch.uint8)
    packed = wide[:, :-1]
    for view in (packed, wide[:, 1:], packed[::2], strided_view(packed), column_major(packed)):
        assert not view.is_contiguous()
        out = lq.unpack(view, bits, size)
        assert out.dtype == torch.uint8 and torch.equal(out.to(torch.int64), ref_unpack(view, bits, size))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int32, torch.uint16, torch.uint32, torch.uint64])
def test_out_of_range_names_the_first_bad_index(dtype):
    q = torch.zeros(3, 10, dtype=dtype)
    q[1, 7] = 16
    q[2, 2] = 99
    with pytest.raises(ValueError, match=re.escape("q[[1, 7]] = 16 is out of range for 4-bit packing")):
        lq.pack(q, 4)


def test_uint64_values_from_2_to_the_63_are_named_as_they_are():
    # ATen compares them as int64s, where they read as negative.
    with pytest.raises(ValueError, match=re.escape("q[[1]] = 9223372036854775808 is out of range for 8-bit packing")):
        lq.pack(torch.tensor([1, 2**63], dtype=torch.uint64), 8)


def test_negative_values():
    with pytest.raises(ValueError, match=re.escape("q[[2]] = -1 is out of range for 2-bit packing")):
        lq.pack(torch.tensor([0, 1, -1, 3], dtype=torch.int8), 2)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits must be between 1 and 8 for packing"):
        lq.pack(torch.zeros(4, dtype=torch.uint8), bits)
    with pytest.raises(ValueError, match="bits must be between 1 and 8 for packing"):
        lq.unpack(torch.zeros(4, dtype=torch.uint8), bits, 4)


def test_bad_dtypes_and_sizes():
    with pytest.raises(ValueError, match="q must hold integers"):
        lq.pack(torch.zeros(4), 4)
    with pytest.raises(ValueError, match="packed must be uint8"):
        lq.unpack(torch.zeros(4, dtype=torch.int8), 4, 8)
    with pytest.raises(ValueError, match="packed has 3 bytes in its last dim, but 8 values of 4 bits take 4"):
        lq.unpack(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="at least one dim"):
        lq.pack(torch.tensor(3, dtype=torch.uint8), 4)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_opcheck(bits):
    q = torch.randint(0, 2**bits, (6, 37), dtype=torch.uint8)
    torch.library.opcheck(torch.ops.linquant.pack.default, (q, bits))
    torch.library.opcheck(torch.ops.linquant.unpack.default, (lq.pack(q, bits), bits, 37))
