"""Where relayd keeps things: the storage contract and its backends (memory, SQLite, Redis)."""
