"""kiln._C.crc32 (the artifact weights' checksum) gives zlib's CRC-32 for every length,
alignment and starting value, and refuses buffers whose bytes are not contiguous."""
import random
import zlib

import numpy as np
import pytest
import torch

from kiln import _C


def test_matches_zlib_on_every_length_and_alignment():
    rng = random.Random(0)
    data = bytes(rng.getrandbits(8) for _ in range(5000))
    for n in [*range(0, 300), 1023, 1024, 4097, 4999]:
        for off in (0, 1, 7):
            chunk = data[off:off + n]
            assert _C.crc32(chunk) == zlib.crc32(chunk), (n, off)


def test_continues_from_a_running_value():
    data = np.random.default_rng(1).integers(0, 256, 100_003, dtype=np.uint8).tobytes()
    for cut in (0, 1, 63, 64, 65, 50_000, len(data)):
        assert _C.crc32(data[cut:], _C.crc32(data[:cut])) == zlib.crc32(data)
    assert _C.crc32(data, 0xDEADBEEF) == zlib.crc32(data, 0xDEADBEEF)


def test_takes_tensor_memory_without_a_copy_and_refuses_strided_views():
    x = torch.randn(97, 33)
    assert _C.crc32(x.numpy()) == zlib.crc32(x.numpy().tobytes())
    assert _C.crc32(x.view(torch.uint8).reshape(-1).numpy()) == zlib.crc32(x.numpy().tobytes())
    with pytest.raises(ValueError, match="contiguous"):
        _C.crc32(x.numpy()[:, ::2])
