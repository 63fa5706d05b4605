"""Testbeds whose answer is known: quality claims are checked against them."""
from .gmm import GaussianMixture, GMMClassifier, GMMEps

__all__ = ["GaussianMixture", "GMMEps", "GMMClassifier"]
