"""The SQLite backend: one file, one writer thread, the store contract (``store``) with its queue, key
directory, writer, schema and file-level tools (backup, stats)."""
