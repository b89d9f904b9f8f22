"""The FUSE clients a Mount Pod (or, later, a sidecar) runs: what image, what command, what env.

A client knows how to serve one filesystem at a mount point inside its container; it knows
nothing of Mount Pods or sidecars. Strategies choose a client by the `client` parameter.
"""
