"""Evaluation: Frechet distance (FID), streaming feature statistics, KID, precision/recall, CLIP score, and the
built-in digits feature network ("digits FD") used by the CPU benchmarks.

CLIP lives in ``fdistill.evaluation.clip`` (``load_clip``, ``clip_score``; imported on use: it loads open_clip) and
clean-fid's Inception in ``fdistill.evaluation.inception``. Reward scorers of generated images (CLIP score, PickScore)
for preference-tuning evaluation: ``fdistill.evaluation.rewards`` (``build_scorer``, ``SCORERS``, ``win_rate``).
"""
from .digits import (
    DigitsFeatureNet, digits_class_histogram, digits_fd, digits_feature_extractor, digits_images, digits_predict,
    digits_reference_statistics,
)
from .extractors import EXTRACTORS, FeatureExtractor, PooledPixelFeatures, build_feature_extractor
from .fid import Statistics, SourceOptions, compute_metrics, evaluate_generator, reference_statistics, source_statistics
from .frechet import (FeatureStats, fid_from_stats, frechet_distance, load_statistics, save_statistics,
                      trace_sqrt_product)
from .metrics import kernel_inception_distance, mmd2_unbiased, precision_recall
from .periodic import Evaluator, make_evaluator
from .preprocess import clean_resize, clean_resize_pil, quantize_to_uint8
from .rewards import SCORERS, build_scorer, win_rate

__all__ = [
    "frechet_distance", "trace_sqrt_product", "FeatureStats", "fid_from_stats", "save_statistics", "load_statistics",
    "DigitsFeatureNet", "digits_fd", "digits_class_histogram", "digits_feature_extractor", "digits_images",
    "digits_predict", "digits_reference_statistics",
    "EXTRACTORS", "FeatureExtractor", "PooledPixelFeatures", "build_feature_extractor", "Statistics", "SourceOptions",
    "compute_metrics",
    "evaluate_generator", "reference_statistics", "source_statistics", "kernel_inception_distance", "mmd2_unbiased",
    "precision_recall", "Evaluator", "make_evaluator", "clean_resize", "clean_resize_pil", "quantize_to_uint8",
    "SCORERS", "build_scorer", "win_rate",
]
