"""Experiments composed from the stages below: the demo (later: paper-table presets, ``reproduce``)."""
