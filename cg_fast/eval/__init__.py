"""cg_fast.eval: metrics for sample sets and the file formats around them.

- ``sliced``: sliced Wasserstein distance, overall and per class (``sliced_wasserstein``,
  ``conditional_sliced_wasserstein``).
- ``frechet``: Gaussian feature statistics and the Fréchet distance (``FeatureStats``, ``frechet_distance``);
  FID when the features are Inception pools.
- ``precision_recall``: improved precision and recall with k-NN manifolds (``precision_recall``).
- ``inception_score``: Inception-score-style score of class predictions (``inception_score``).
- ``npz``: the ADM evaluator's sample-batch .npz format (``save_sample_batch``, ``load_sample_batch``,
  ``to_uint8``, ``from_uint8``).
- ``inception``: Inception-V3 pool features (and logits) from a local weights file via the optional
  torch-fidelity (``inception_features``, ``inception_features_and_logits``).
- ``score``: sample batches scored against a reference through a feature extractor, behind ``cg-fast eval``
  (``digits_extractor``, ``inception_extractor``, ``load_reference``, ``score_batch``).
- ``diagnostics``: per-step model-fitting diagnostics as sampler callbacks (``ClassifierProbe``: on- and
  off-sampling loss/accuracy; ``GuidanceTrace``: cosine similarity of successive fresh guidance;
  ``Diagnostics``: both).
- ``images``: sample grids as PNG files without an imaging dependency (``save_grid``, ``make_grid``).

Note: the names ``precision_recall`` and ``inception_score`` below are the functions; reach the submodules of
the same names through ``importlib.import_module("cg_fast.eval.precision_recall")`` if you need them.
"""
from .frechet import FeatureStats, frechet_distance
from .inception import inception_features, inception_features_and_logits
from .inception_score import InceptionScore, inception_score
from .npz import from_uint8, load_sample_batch, save_sample_batch, to_uint8
from .precision_recall import PrecisionRecall, precision_recall
from .sliced import conditional_sliced_wasserstein, sliced_wasserstein

from .diagnostics import ClassifierProbe, Diagnostics, GuidanceTrace
from .images import make_grid, save_grid, write_png

__all__ = [
    "sliced_wasserstein", "conditional_sliced_wasserstein",
    "FeatureStats", "frechet_distance",
    "PrecisionRecall", "precision_recall",
    "InceptionScore", "inception_score",
    "save_sample_batch", "load_sample_batch", "to_uint8", "from_uint8",
    "inception_features", "inception_features_and_logits",
    "ClassifierProbe", "GuidanceTrace", "Diagnostics",
    "make_grid", "save_grid", "write_png",
]
