"""Evaluation: Frechet distance (FID), streaming feature statistics, KID, precision/recall, CLIP score, and the
built-in digits feature network ("digits FD") used by the CPU benchmarks."""
from .digits import (
    DigitsFeatureNet, digits_class_histogram, digits_fd, digits_feature_extractor, digits_images, digits_predict,
    digits_reference_statistics,
)
from .frechet import FeatureStats, fid_from_stats, frechet_distance, load_statistics, save_statistics, trace_sqrt_product

__all__ = [
    "frechet_distance", "trace_sqrt_product", "FeatureStats", "fid_from_stats", "save_statistics", "load_statistics",
    "DigitsFeatureNet", "digits_fd", "digits_class_histogram", "digits_feature_extractor", "digits_images",
    "digits_predict", "digits_reference_statistics",
]
