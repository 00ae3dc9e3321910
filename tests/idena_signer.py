"""Deterministic secp256k1 signer for tests: the package's own signer, re-exported.

The signing code lives in ``relayd.identity.signing``; this module keeps the
names older test modules import.
"""

from relayd.identity.signing import address_of_private, sign_hash, sign_text

__all__ = ["address_of_private", "sign_hash", "sign_text"]
