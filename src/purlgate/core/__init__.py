"""The batch core: bytes and rows in, result files and events out. No sockets."""
