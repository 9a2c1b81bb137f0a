"""Measuring: fidelity, timing, provenance, the report and the verdict."""
