"""Evaluation: bits-per-byte on the shared eval set, CORE."""
