"""Who is who: sign-in and ownership proofs, Idena signatures, signed statements, REST tokens."""
