"""Legacy Keccak-256 (pre-FIPS padding 0x01), as used by Idena and Ethereum.

hashlib's sha3_256 pads with 0x06 and gives different digests, so the
legacy variant is implemented here in pure Python. The permutation is fully
unrolled over 25 local integer lanes because attribute and list access
dominate the cost of a straightforward loop-based implementation.
"""

from __future__ import annotations

import struct

__all__ = ["keccak256"]

_RATE = 136
_MASK = 0xFFFFFFFFFFFFFFFF
_BLOCK = struct.Struct("<17Q")
_DIGEST = struct.Struct("<4Q")

# Lanes kept complemented between rounds ("lane complementing"): chi then
# needs one NOT per plane instead of five.
_COMPLEMENTED = (1, 2, 8, 12, 17, 20)
_INITIAL_STATE = tuple(_MASK if i in _COMPLEMENTED else 0 for i in range(25))

_ROUND_CONSTANTS = (
    0x0000000000000001, 0x0000000000008082, 0x800000000000808A,
    0x8000000080008000, 0x000000000000808B, 0x0000000080000001,
    0x8000000080008081, 0x8000000000008009, 0x000000000000008A,
    0x0000000000000088, 0x0000000080008009, 0x000000008000000A,
    0x000000008000808B, 0x800000000000008B, 0x8000000000008089,
    0x8000000000008003, 0x8000000000008002, 0x8000000000000080,
    0x000000000000800A, 0x800000008000000A, 0x8000000080008081,
    0x8000000000008080, 0x0000000080000001, 0x8000000080008008,
)


def _keccak_f(lanes: list[int]) -> list[int]:
    """Keccak-f[1600] on 25 lanes (x + 5*y), lanes in _COMPLEMENTED stored inverted."""
    (a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12,
     a13, a14, a15, a16, a17, a18, a19, a20, a21, a22, a23, a24) = lanes
    m = _MASK
    for rc in _ROUND_CONSTANTS:
        c0 = a0 ^ a5 ^ a10 ^ a15 ^ a20
        c1 = a1 ^ a6 ^ a11 ^ a16 ^ a21
        c2 = a2 ^ a7 ^ a12 ^ a17 ^ a22
        c3 = a3 ^ a8 ^ a13 ^ a18 ^ a23
        c4 = a4 ^ a9 ^ a14 ^ a19 ^ a24
        d0 = c4 ^ (((c1 << 1) | (c1 >> 63)) & m)
        d1 = c0 ^ (((c2 << 1) | (c2 >> 63)) & m)
        d2 = c1 ^ (((c3 << 1) | (c3 >> 63)) & m)
        d3 = c2 ^ (((c4 << 1) | (c4 >> 63)) & m)
        d4 = c3 ^ (((c0 << 1) | (c0 >> 63)) & m)
        b0 = a0 ^ d0
        t = a5 ^ d0
        b16 = ((t << 36) & m) | (t >> 28)
        t = a10 ^ d0
        b7 = ((t << 3) & m) | (t >> 61)
        t = a15 ^ d0
        b23 = ((t << 41) & m) | (t >> 23)
        t = a20 ^ d0
        b14 = ((t << 18) & m) | (t >> 46)
        t = a1 ^ d1
        b10 = ((t << 1) & m) | (t >> 63)
        t = a6 ^ d1
        b1 = ((t << 44) & m) | (t >> 20)
        t = a11 ^ d1
        b17 = ((t << 10) & m) | (t >> 54)
        t = a16 ^ d1
        b8 = ((t << 45) & m) | (t >> 19)
        t = a21 ^ d1
        b24 = ((t << 2) & m) | (t >> 62)
        t = a2 ^ d2
        b20 = ((t << 62) & m) | (t >> 2)
        t = a7 ^ d2
        b11 = ((t << 6) & m) | (t >> 58)
        t = a12 ^ d2
        b2 = ((t << 43) & m) | (t >> 21)
        t = a17 ^ d2
        b18 = ((t << 15) & m) | (t >> 49)
        t = a22 ^ d2
        b9 = ((t << 61) & m) | (t >> 3)
        t = a3 ^ d3
        b5 = ((t << 28) & m) | (t >> 36)
        t = a8 ^ d3
        b21 = ((t << 55) & m) | (t >> 9)
        t = a13 ^ d3
        b12 = ((t << 25) & m) | (t >> 39)
        t = a18 ^ d3
        b3 = ((t << 21) & m) | (t >> 43)
        t = a23 ^ d3
        b19 = ((t << 56) & m) | (t >> 8)
        t = a4 ^ d4
        b15 = ((t << 27) & m) | (t >> 37)
        t = a9 ^ d4
        b6 = ((t << 20) & m) | (t >> 44)
        t = a14 ^ d4
        b22 = ((t << 39) & m) | (t >> 25)
        t = a19 ^ d4
        b13 = ((t << 8) & m) | (t >> 56)
        t = a24 ^ d4
        b4 = ((t << 14) & m) | (t >> 50)
        a0 = b0 ^ (b1 | b2)
        a1 = b1 ^ ((b2 ^ m) | b3)
        a2 = b2 ^ (b3 & b4)
        a3 = b3 ^ (b4 | b0)
        a4 = b4 ^ (b0 & b1)
        a5 = b5 ^ (b6 | b7)
        a6 = b6 ^ (b7 & b8)
        a7 = b7 ^ (b8 | (b9 ^ m))
        a8 = b8 ^ (b9 | b5)
        a9 = b9 ^ (b5 & b6)
        a10 = b10 ^ (b11 | b12)
        a11 = b11 ^ (b12 & b13)
        a12 = b12 ^ ((b13 ^ m) & b14)
        a13 = (b13 ^ m) ^ (b14 | b10)
        a14 = b14 ^ (b10 & b11)
        a15 = b15 ^ (b16 & b17)
        a16 = b16 ^ (b17 | b18)
        a17 = b17 ^ ((b18 ^ m) | b19)
        a18 = (b18 ^ m) ^ (b19 & b15)
        a19 = b19 ^ (b15 | b16)
        a20 = b20 ^ ((b21 ^ m) & b22)
        a21 = (b21 ^ m) ^ (b22 | b23)
        a22 = b22 ^ (b23 & b24)
        a23 = b23 ^ (b24 | b20)
        a24 = b24 ^ (b20 & b21)
        a0 ^= rc
    return [a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12,
            a13, a14, a15, a16, a17, a18, a19, a20, a21, a22, a23, a24]


def _sponge(data: bytes, domain: int) -> bytes:
    """Rate-136 sponge with a 256-bit output; ``domain`` is the first pad byte.

    Keccak-256 uses 0x01 and FIPS SHA3-256 uses 0x06, which lets the tests
    check the permutation against hashlib.sha3_256.
    """
    data = bytes(data)
    pad_len = _RATE - len(data) % _RATE
    if pad_len == 1:
        padded = data + bytes((domain | 0x80,))
    else:
        padded = data + bytes((domain,)) + bytes(pad_len - 2) + b"\x80"
    state = list(_INITIAL_STATE)
    unpack = _BLOCK.unpack_from
    for offset in range(0, len(padded), _RATE):
        block = unpack(padded, offset)
        for i in range(17):
            state[i] ^= block[i]
        state = _keccak_f(state)
    return _DIGEST.pack(state[0], state[1] ^ _MASK, state[2] ^ _MASK, state[3])


def keccak256(data: bytes) -> bytes:
    """Return the 32-byte legacy Keccak-256 digest of ``data``."""
    return _sponge(data, 0x01)
