"""Tests of repofs.cli.main."""
