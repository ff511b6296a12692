"""Tests of repofs.maintenance, fault campaigns included."""
