"""Experiments composed from the stages below: the demo, the paper-table presets (``presets``) and
``reproduce`` (train, evaluate, audit and report one table; ``logitpair reproduce``)."""
