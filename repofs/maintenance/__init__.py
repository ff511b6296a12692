"""Maintenance of a repository: verify, prune, gc, rebuild, pack scanning, info."""
