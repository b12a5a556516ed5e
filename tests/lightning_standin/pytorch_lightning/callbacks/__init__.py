"""Test stand-in for `pytorch_lightning.callbacks` (see the package docstring)."""
