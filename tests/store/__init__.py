"""Tests of repofs.store."""
