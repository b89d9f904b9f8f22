"""Operating-system helpers for strategies: mounts, the mount table, safe paths, blocking calls.

This layer knows neither CSI nor Kubernetes.
"""
