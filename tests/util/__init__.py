"""Tests of repofs.util."""
