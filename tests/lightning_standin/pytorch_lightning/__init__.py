"""Test stand-in for `pytorch_lightning`: only lets tests pickle objects under Lightning's names.

Never importable in normal runs: tests put `tests/lightning_standin` on sys.path only while writing
a checkpoint, then remove it and these modules from sys.modules.
"""
