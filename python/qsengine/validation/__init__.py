"""Validation of the step model against published measurements (``qsengine validate``)."""
