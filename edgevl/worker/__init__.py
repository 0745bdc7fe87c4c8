"""The model in its own memory-capped process: the daemon's supervisor, the child, the protocol between them."""
