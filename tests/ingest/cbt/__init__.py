"""Tests of ingest.cbt.blocks."""
