"""The Kubernetes side of the node plugin: a small API surface and a node-scoped pod cache."""
