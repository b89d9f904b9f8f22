"""sidecar: the FUSE client runs in the app pod as an unprivileged native sidecar; the node plugin
opens /dev/fuse, mounts the target with that fd and hands the fd to the sidecar."""
