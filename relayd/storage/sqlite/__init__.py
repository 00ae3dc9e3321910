"""The SQLite backend: one file, one writer thread, the store contract (``store``) with its queue, key
directory, push subscriptions (``push``), writer, schema and file-level tools (backup, stats)."""
