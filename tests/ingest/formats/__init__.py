"""Tests of ingest.formats."""
