"""Testbeds whose answer is known or can be checked: quality claims are measured on them.

- ``gmm``: a Gaussian mixture with exact noisy eps model and classifier (the exact answer is known).
- ``gmm_trained``: a trained, imperfect noisy classifier for that mixture (shipped weights), so that model
  fitting can be studied where the exact answer is known.
- ``digits``: a trained image testbed on scikit-learn's 8x8 digits (shipped weights): two UNets, a guiding
  classifier and two judges; ``digits_data``, ``digits_nets``, ``digits_train`` hold its data, networks
  and training (``cg-fast train-testbed``).
- ``tiny``: small random-weight conv nets with the cost profile of the real thing (tests, benchmarks).
"""
from .digits import DigitsTestbed, load_testbed
from .gmm import GaussianMixture, GMMClassifier, GMMEps
from .gmm_trained import GMMTrainedClassifier, default_gmm_classifier, load_gmm_classifier

__all__ = ["GaussianMixture", "GMMEps", "GMMClassifier", "GMMTrainedClassifier", "default_gmm_classifier",
           "load_gmm_classifier", "DigitsTestbed", "load_testbed"]
