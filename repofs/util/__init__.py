"""Helpers every layer may use: progress display, direct I/O, malloc tuning, stop signals."""
