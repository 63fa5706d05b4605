"""Scores of sample batches against a reference, behind ``cg-fast eval``: features from a judge network, then
FD, precision/recall and an Inception-style score (the metrics are the functions of frechet.py,
precision_recall.py and inception_score.py; this module only feeds them).

    ext = digits_extractor()                                 # or inception_extractor("weights-inception-....pth")
    ref = load_reference("ref.npz", ext)                     # or load_reference("digits", ext): the real digits
    images, labels = load_sample_batch("samples.npz")
    score_batch(images, labels, ref, ext)                    # {'n', 'fd', 'precision', 'recall', 'is', ...}

Feature extractors (:class:`Extractor`) map uint8 NHWC images to (features [n, D] float64, logits [n, K]):

- ``digits``: the shipped digits testbed's judge (64-d feature layer, 10 classes, at t = 0): 8x8 grey images.
- ``inception``: Inception-V3 through the optional torch-fidelity with a LOCAL weights file (2048-d pool
  features, ``logits_unbiased`` for the score); any resolution, resized by the network.

References (:func:`load_reference`):

- a sample batch (``arr_0`` images, as ``cg-fast sample`` writes): features computed the same way.
- precomputed statistics ``mu`` / ``sigma`` (the ADM evaluator's reference batches; ``FeatureStats.save``):
  FD from them, as the ADM evaluator does. Precision/recall need the reference's features, so they come from
  its images when the file has them (``arr_0``) and are left out otherwise (FD only; ``Reference.note`` says so).
- ``"digits"``: the 1,797 real digits that ship with scikit-learn (digits features only).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .frechet import FeatureStats, frechet_distance
from .inception_score import inception_score
from .npz import _check_uint8_nhwc, from_uint8, load_sample_batch, to_uint8
from .precision_recall import precision_recall

__all__ = ["Extractor", "Reference", "digits_extractor", "inception_extractor", "load_reference", "score_batch",
           "FEATURES"]

FEATURES = ("digits", "inception")
_CHUNK = 1000  # images per extractor call (bounds memory; one progress tick each)


@dataclass
class Extractor:
    """uint8 NHWC images -> (features [n, D] float64, logits [n, K] or None), in chunks."""

    name: str                                   # "digits" | "inception"
    dim: int                                    # D
    run: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    image_shape: tuple[int, int, int] | None    # the (H, W, C) it takes, or None: any
    labels_are_classes: bool                    # its logits' classes are the batches' labels (the judge's accuracy)

    def check(self, image_shape: tuple[int, ...]) -> None:
        """A ValueError if this extractor does not take images of (H, W, C) ``image_shape``."""
        if self.image_shape is not None and tuple(image_shape) != self.image_shape:
            h, w, c = self.image_shape
            raise ValueError(f"the {self.name} features take {h}x{w}x{c} images; these are "
                             f"{'x'.join(map(str, image_shape))} (use --features inception for other images)")

    def __call__(self, images: np.ndarray, progress: Callable[[int], None] | None = None
                 ) -> tuple[np.ndarray, np.ndarray | None]:
        self.check(images.shape[1:])
        feats, logits = [], []
        for i in range(0, len(images), _CHUNK):
            f, lg = self.run(images[i:i + _CHUNK])
            feats.append(f)
            if lg is not None:
                logits.append(lg)
            if progress is not None:
                progress(min(_CHUNK, len(images) - i))
        return np.concatenate(feats), (np.concatenate(logits) if logits else None)


def digits_extractor(weights: str | os.PathLike | None = None) -> Extractor:
    """The digits testbed's judge (shipped weights, or a ``cg-fast train-testbed`` folder)."""
    from ..testbeds.digits import load_testbed

    tb = load_testbed(weights, networks=("judge",))

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = from_uint8(images)
        with torch.no_grad():
            logits = tb.judge(x, torch.zeros(len(x), dtype=torch.long))
        return tb.features(x).numpy(), logits.double().numpy()
    return Extractor("digits", int(tb.judge.config.feature_dim), run, (8, 8, 1), True)


def inception_extractor(weights_path: str | os.PathLike | None, batch_size: int = 64,
                        device: str | torch.device | None = None) -> Extractor:
    """Inception-V3 via torch-fidelity from a local weights file (see cg_fast.eval.inception)."""
    from .inception import _extractor_class, _missing_weights, inception_features_and_logits

    if weights_path is None:
        raise ValueError(_missing_weights("--features inception needs --inception-weights FILE"))
    if not Path(weights_path).expanduser().is_file():
        raise FileNotFoundError(_missing_weights(f"Inception weights file {str(weights_path)!r} does not exist"))
    _extractor_class()  # torch-fidelity missing or too old: say so before any work

    def run(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        f, lg = inception_features_and_logits(images, weights_path, batch_size, device, layout="NHWC")
        return f.double().numpy(), lg.double().numpy()
    return Extractor("inception", 2048, run, None, False)


@dataclass
class Reference:
    """What samples are compared with: statistics for FD; features (and images' shape) when images exist."""

    name: str
    stats: FeatureStats
    features: np.ndarray | None                 # None: statistics only (FD only)
    image_shape: tuple[int, ...] | None
    note: str | None = None                     # what is left out and why


def load_reference(ref: str | os.PathLike, extractor: Extractor,
                   progress: Callable[[int], None] | None = None) -> Reference:
    """The reference ``ref`` (a file, or ``"digits"``) under ``extractor`` (see the module doc)."""
    if str(ref) == "digits" and not Path(ref).exists():
        if extractor.name != "digits":
            raise ValueError("--ref digits (the real digits) goes with --features digits")
        from ..testbeds.digits_data import load_digits_data

        images = to_uint8(load_digits_data().x).numpy()  # quantised as samples are, so like is compared with like
        feats, _ = extractor(images, progress)
        return Reference("digits (1,797 real digits)", FeatureStats.from_features(feats), feats, images.shape[1:])
    path = Path(ref)
    if not path.is_file():
        raise FileNotFoundError(f"reference {str(ref)!r} does not exist (pass a .npz: a sample batch with arr_0, or "
                                "statistics mu/sigma such as the ADM evaluator's reference batches)")
    try:
        z = np.load(path, allow_pickle=False)
        if not isinstance(z, np.lib.npyio.NpzFile):
            raise ValueError("it holds a single array, not an .npz archive")
        with z:
            files = set(z.files)
            mu = z["mu"] if "mu" in files else None
            sigma = z["sigma"] if "sigma" in files else None
    except (ValueError, OSError, EOFError) as e:
        raise ValueError(f"reference {path} is not a readable .npz ({type(e).__name__}: {e})") from e
    if (mu is None) != (sigma is None):
        raise ValueError(f"reference {path} has {'mu' if mu is not None else 'sigma'} without "
                         f"{'sigma' if mu is not None else 'mu'}; statistics need both")
    if mu is None and "arr_0" not in files:
        raise ValueError(f"reference {path} holds neither images (arr_0) nor statistics (mu, sigma); it holds "
                         f"{sorted(files)}")
    stats = None
    if mu is not None:
        stats = FeatureStats(mu, sigma)
        if stats.dim != extractor.dim:
            raise ValueError(f"reference {path} holds {stats.dim}-d statistics but the {extractor.name} features are "
                             f"{extractor.dim}-d: it was made with another network (2048-d: Inception, "
                             "--features inception)")
    if "arr_0" not in files:
        return Reference(str(path), stats, None, None,
                         note=f"{path.name} holds statistics only (mu, sigma: the ADM evaluator's reference layout): "
                              "FD only; precision and recall need reference images (arr_0)")
    images, _ = load_sample_batch(path)
    feats, _ = extractor(images, progress)
    return Reference(str(path), stats if stats is not None else FeatureStats.from_features(feats), feats,
                     images.shape[1:])


def score_batch(images: np.ndarray, labels: np.ndarray | None, ref: Reference, extractor: Extractor, *, k: int = 3,
                splits: int = 1, progress: Callable[[int], None] | None = None) -> dict[str, float | int | None]:
    """FD to ``ref``, precision/recall (None without reference features), the Inception-style score of the
    extractor's logits (mean, std over ``splits``) and, for the digits judge with labels, its accuracy."""
    _check_uint8_nhwc(images, "samples")
    extractor.check(images.shape[1:])
    if ref.image_shape is not None and tuple(images.shape[1:]) != tuple(ref.image_shape):
        raise ValueError(f"samples are {'x'.join(map(str, images.shape[1:]))} images but the reference's are "
                         f"{'x'.join(map(str, ref.image_shape))}: compare batches of the same resolution")
    if len(images) < 2:
        raise ValueError(f"{len(images)} sample(s): FD needs at least 2")
    feats, logits = extractor(images, progress)
    out: dict[str, float | int | None] = {"n": int(len(images)), "fd": frechet_distance(feats, ref.stats),
                                          "precision": None, "recall": None}
    if ref.features is not None:
        pr = precision_recall(ref.features, feats, k=k)
        out["precision"], out["recall"] = pr.precision, pr.recall
    if logits is not None:
        used = min(splits, len(images))  # a batch smaller than the splits: one sample per split
        score = inception_score(logits, splits=used)
        out["is"], out["is_std"], out["is_splits"] = score.mean, score.std, used
    if labels is not None and logits is not None and extractor.labels_are_classes:
        out["label_acc"] = float((logits.argmax(1) == labels).mean())
    return out
