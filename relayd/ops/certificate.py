"""When the TLS certificate relayd serves expires, read from its PEM file for the expiry metric.

The standard library loads certificates into an ``SSLContext`` but does not say when a server's own one
expires, so the leaf certificate's ``notAfter`` is read here from its DER encoding (RFC 5280, section 4.1).
"""

from __future__ import annotations

import calendar
import re
import ssl
import time

_PEM = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


class CertificateError(ValueError):
    """The file holds no certificate whose validity can be read."""


def _element(der: bytes, pos: int) -> tuple[int, int, int]:
    """The DER element at ``pos``: its tag, where its content starts and where it ends."""
    if pos + 2 > len(der):
        raise CertificateError("truncated DER element")
    tag, length = der[pos], der[pos + 1]
    start = pos + 2
    if length & 0x80:
        count = length & 0x7F
        if not 1 <= count <= 4 or start + count > len(der):
            raise CertificateError("bad DER length")
        length = int.from_bytes(der[start:start + count], "big")
        start += count
    if start + length > len(der):
        raise CertificateError("truncated DER element")
    return tag, start, start + length


def _time(tag: int, text: bytes) -> float:
    value = text.decode("ascii")
    if tag == 0x17:  # UTCTime, YYMMDDHHMMSSZ: years 50-99 are 19xx (RFC 5280, 4.1.2.5.1)
        year = int(value[:2])
        value = f"{1900 + year if year >= 50 else 2000 + year}{value[2:]}"
    elif tag != 0x18:  # GeneralizedTime, YYYYMMDDHHMMSSZ
        raise CertificateError(f"validity time has tag {tag:#x}")
    if not re.fullmatch(r"\d{14}Z", value):
        raise CertificateError(f"validity time {value!r} is not YYYYMMDDHHMMSSZ")
    return float(calendar.timegm(time.strptime(value, "%Y%m%d%H%M%SZ")))


def not_after(der: bytes) -> float:
    """A DER certificate's ``notAfter`` as Unix time."""
    _, cert, _ = _element(der, 0)                # Certificate ::= SEQUENCE
    _, pos, _ = _element(der, cert)              # tbsCertificate ::= SEQUENCE
    tag, _, end = _element(der, pos)
    if tag == 0xA0:                              # [0] version, absent in v1 certificates
        pos = end
    for _ in range(3):                           # serialNumber, signature, issuer
        pos = _element(der, pos)[2]
    _, validity, _ = _element(der, pos)          # Validity ::= SEQUENCE { notBefore, notAfter }
    after = _element(der, validity)[2]
    tag, start, end = _element(der, after)
    return _time(tag, der[start:end])


def certificate_not_after(certfile: str) -> float:
    """The ``notAfter`` of the first certificate in a PEM file (the server's own, ahead of its chain)."""
    with open(certfile, encoding="ascii", errors="replace") as f:
        found = _PEM.search(f.read())
    if found is None:
        raise CertificateError(f"{certfile}: no PEM certificate")
    try:
        der = ssl.PEM_cert_to_DER_cert(found.group(0))
    except ValueError as exc:
        raise CertificateError(f"{certfile}: {exc}") from exc
    return not_after(der)
