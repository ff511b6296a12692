"""The FUSE mount: the daemon, the FUSE adapter, the tree model and the descriptor."""
