"""inprocess: the node plugin serves each volume through fusecsi's own FUSE filesystem."""
