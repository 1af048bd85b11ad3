"""Small synthetic 'digits' for fast, exact tests (no MNIST files needed).

The registered ``synthetic`` dataset (``fl.datasets.synthetic``); kept here
under its old import path for the tests that use it.
"""

from __future__ import annotations

from fl.datasets.synthetic import synthetic_split, synthetic_splits

__all__ = ["synthetic_split", "synthetic_splits"]
