"""The CSI face of fusecsi: gRPC servicers, settings, the command line.

This package knows the CSI protocol and nothing about any particular strategy: it parses a
request once, looks the strategy up by name in the registry and delegates.
"""
