"""Fixtures and helpers the tests share."""
