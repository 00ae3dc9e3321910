"""secp256k1 public-key recovery in pure Python (no third-party runtime deps).

Points are (X, Y, Z) Jacobian tuples with Z == 0 meaning infinity, so the hot
loops need a single modular inversion at the end. u1*G uses a lazily built
signed 8-bit fixed-base table (33 windows, additions only, no doublings);
u2*R uses the GLV endomorphism with two interleaved width-5 wNAF chains, and
both products accumulate into the same point.
"""

from __future__ import annotations

__all__ = [
    "P",
    "N",
    "G",
    "is_on_curve",
    "lift_x",
    "point_mul_g",
    "precompute",
    "recover_pubkey",
]

P = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEFFFFFC2F
N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
G = (
    0x79BE667EF9DCBBAC55A06295CE870B07029BFCDB2DCE28D959F2815B16F81798,
    0x483ADA7726A3C4655DA4FBFC0E1108A8FD17B448A68554199C47D08FFB10D4B8,
)

_SQRT_EXP = (P + 1) // 4
_INFINITY = (1, 1, 0)
_WINDOW_BITS = 8
_WINDOWS = 256 // _WINDOW_BITS + 1
_HALF_WINDOW = 1 << (_WINDOW_BITS - 1)
_WINDOW_MASK = (1 << _WINDOW_BITS) - 1
_WNAF_WIDTH = 5
_HALF_N = N // 2

# GLV endomorphism: beta^3 = 1 mod p, lambda^3 = 1 mod n, and a short lattice
# basis {(a1, b1), (a2, b2)} of {(x, y): x + y*lambda = 0 mod n}.
_BETA = 0x7AE96A2B657C07106E64479EAC3434E99CF0497512F58995C1396C28719501EE
_LAMBDA = 0x5363AD4CC05C30E0A5261C028812645A122E22EA20816678DF02967C1B23BD72
_GLV_A1 = 0x3086D221A7D46BCDE86C90E49284EB15
_GLV_B1 = -0xE4437ED6010E88286F547FA90ABFE4C3
_GLV_A2 = 0x114CA50F7A8E2F3F657C1108D9D44CFD8
_GLV_B2 = 0x3086D221A7D46BCDE86C90E49284EB15

Affine = tuple[int, int]
Jacobian = tuple[int, int, int]

_g_table: list[list[Affine]] | None = None


def is_on_curve(x: int, y: int) -> bool:
    """True if (x, y) is a finite point of y^2 = x^3 + 7 over F_p."""
    return 0 <= x < P and 0 <= y < P and (y * y - x * x * x - 7) % P == 0


def lift_x(x: int, odd: int) -> Affine | None:
    """The curve point with this x and y parity, or None if x is not on the curve."""
    if not 0 <= x < P:
        return None
    alpha = (x * x * x + 7) % P
    y = pow(alpha, _SQRT_EXP, P)
    if y * y % P != alpha:
        return None
    if y & 1 != odd & 1:
        y = P - y
    return x, y


def _double(pt: Jacobian) -> Jacobian:
    """Jacobian doubling for a = 0; secp256k1 has no point with y = 0."""
    x, y, z = pt
    if z == 0:
        return pt
    p = P
    yy = y * y % p
    s = 4 * x * yy % p
    m = 3 * x * x % p
    x3 = (m * m - 2 * s) % p
    return x3, (m * (s - x3) - 8 * yy * yy) % p, 2 * y * z % p


def _add_affine(pt: Jacobian, x2: int, y2: int) -> Jacobian:
    """Jacobian + affine ("mixed") addition, handling doubling and inverses."""
    x1, y1, z1 = pt
    if z1 == 0:
        return x2, y2, 1
    p = P
    zz = z1 * z1 % p
    h = (x2 * zz - x1) % p
    r = (y2 * zz * z1 - y1) % p
    if h == 0:
        return _double((x2, y2, 1)) if r == 0 else _INFINITY
    hh = h * h % p
    hhh = h * hh % p
    v = x1 * hh % p
    x3 = (r * r - hhh - 2 * v) % p
    return x3, (r * (v - x3) - y1 * hhh) % p, z1 * h % p


def _to_affine(pt: Jacobian) -> Affine | None:
    x, y, z = pt
    if z == 0:
        return None
    zi = pow(z, -1, P)
    zi2 = zi * zi % P
    return x * zi2 % P, y * zi2 * zi % P


def _batch_to_affine(points: list[Jacobian]) -> list[Affine]:
    """Normalise finite points with one inversion (Montgomery's trick)."""
    p = P
    prefix = []
    acc = 1
    for _, _, z in points:
        prefix.append(acc)
        acc = acc * z % p
    inv = pow(acc, -1, p)
    out: list[Affine] = [(0, 0)] * len(points)
    for i in range(len(points) - 1, -1, -1):
        x, y, z = points[i]
        zi = inv * prefix[i] % p
        inv = inv * z % p
        zi2 = zi * zi % p
        out[i] = (x * zi2 % p, y * zi2 * zi % p)
    return out


def _build_g_table() -> list[list[Affine]]:
    """table[i][j] = (j + 1) * 2^(8i) * G for j < 128, all affine."""
    table = []
    base = G
    for _ in range(_WINDOWS):
        row = [(base[0], base[1], 1)]
        for _ in range(_HALF_WINDOW - 1):
            row.append(_add_affine(row[-1], base[0], base[1]))
        affine_row = _batch_to_affine(row)
        table.append(affine_row)
        top = affine_row[-1]
        nxt = _to_affine(_double((top[0], top[1], 1)))
        assert nxt is not None
        base = nxt
    return table


def precompute() -> None:
    """Build the fixed-base table now rather than on the first multiplication."""
    global _g_table
    if _g_table is None:
        _g_table = _build_g_table()


def _add_mul_g(acc: Jacobian, k: int) -> Jacobian:
    """acc + k*G via signed 8-bit windows over the fixed-base table."""
    if _g_table is None:
        precompute()
    table = _g_table
    assert table is not None
    carry = 0
    for row in table:
        digit = (k & _WINDOW_MASK) + carry
        k >>= _WINDOW_BITS
        if digit >= _HALF_WINDOW:
            digit -= 1 << _WINDOW_BITS
            carry = 1
        else:
            carry = 0
        if digit > 0:
            x, y = row[digit - 1]
            acc = _add_affine(acc, x, y)
        elif digit < 0:
            x, y = row[-digit - 1]
            acc = _add_affine(acc, x, P - y)
    return acc


def _wnaf(k: int, width: int) -> list[int]:
    """Width-w NAF digits of k, least significant first."""
    digits = []
    full = 1 << width
    half = full >> 1
    while k:
        if k & 1:
            d = k & (full - 1)
            if d >= half:
                d -= full
            k -= d
        else:
            d = 0
        digits.append(d)
        k >>= 1
    return digits


def _split_scalar(k: int) -> tuple[int, int]:
    """GLV split: k = k1 + k2*lambda (mod n) with |k1|, |k2| < 2^129."""
    c1 = (_GLV_B2 * k + _HALF_N) // N
    c2 = (-_GLV_B1 * k + _HALF_N) // N
    return k - c1 * _GLV_A1 - c2 * _GLV_A2, -c1 * _GLV_B1 - c2 * _GLV_B2


def _odd_multiples(point: Affine) -> list[Affine]:
    """[1, 3, 5, ..., 2^(w-1) - 1] * point in affine form (w = wNAF width)."""
    x, y = point
    twice = _to_affine(_double((x, y, 1)))
    assert twice is not None
    tx, ty = twice
    odd = [(x, y, 1)]
    for _ in range((1 << (_WNAF_WIDTH - 2)) - 1):
        odd.append(_add_affine(odd[-1], tx, ty))
    return _batch_to_affine(odd)


def _mul_glv(point: Affine, k: int) -> Jacobian:
    """k*point via the endomorphism (x, y) -> (beta*x, y) = lambda*(x, y).

    Halves the doublings: two interleaved ~128-bit wNAF chains instead of one
    256-bit chain.
    """
    p = P
    k1, k2 = _split_scalar(k)
    base = _odd_multiples(point)
    first = [(x, p - y) if k1 < 0 else (x, y) for x, y in base]
    second = [(_BETA * x % p, p - y if k2 < 0 else y) for x, y in base]
    d1 = _wnaf(abs(k1), _WNAF_WIDTH)
    d2 = _wnaf(abs(k2), _WNAF_WIDTH)
    length = max(len(d1), len(d2))
    d1 += [0] * (length - len(d1))
    d2 += [0] * (length - len(d2))
    acc = _INFINITY
    for i in range(length - 1, -1, -1):
        acc = _double(acc)
        d = d1[i]
        if d > 0:
            mx, my = first[d >> 1]
            acc = _add_affine(acc, mx, my)
        elif d < 0:
            mx, my = first[(-d) >> 1]
            acc = _add_affine(acc, mx, p - my)
        d = d2[i]
        if d > 0:
            mx, my = second[d >> 1]
            acc = _add_affine(acc, mx, my)
        elif d < 0:
            mx, my = second[(-d) >> 1]
            acc = _add_affine(acc, mx, p - my)
    return acc


def point_mul_g(k: int) -> Affine:
    """k*G in affine coordinates; raises ValueError if k is 0 mod n."""
    result = _to_affine(_add_mul_g(_INFINITY, k % N))
    if result is None:
        raise ValueError("scalar is zero modulo the group order")
    return result


def recover_pubkey(msg_hash: bytes, r: int, s: int, recid: int) -> bytes | None:
    """Recover the signer's 65-byte uncompressed key, or None if invalid.

    Q = r^-1 (s*R - e*G), where R is the point with x = r (+ n if recid >= 2)
    and y parity recid & 1. Any malformed input yields None, never an error.
    """
    try:
        if not isinstance(msg_hash, (bytes, bytearray)) or len(msg_hash) != 32:
            return None
        for value in (r, s, recid):
            if not isinstance(value, int) or isinstance(value, bool):
                return None
        if not (0 < r < N and 0 < s < N and 0 <= recid <= 3):
            return None
        point = lift_x(r + N * (recid >> 1), recid & 1)
        if point is None:
            return None
        e = int.from_bytes(msg_hash, "big") % N
        r_inv = pow(r, -1, N)
        u1 = -e * r_inv % N
        u2 = s * r_inv % N
        q = _to_affine(_add_mul_g(_mul_glv(point, u2), u1))
        if q is None or not is_on_curve(*q):
            return None
        return b"\x04" + q[0].to_bytes(32, "big") + q[1].to_bytes(32, "big")
    except Exception:
        return None
