"""mountpod: a FUSE client in a Mount Pod per (node, share key, settings), shared by app pods."""
