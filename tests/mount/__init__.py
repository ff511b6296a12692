"""Tests of repofs.mount.daemon and of restores through it."""
