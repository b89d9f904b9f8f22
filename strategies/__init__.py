"""How a volume reaches a target: the Strategy contract, its implementations and their helpers.

Nothing in here knows about gRPC; the CSI layer (`csi/`) parses requests into the types of
`strategies.base` and maps `strategies.errors` to gRPC status codes.
"""
