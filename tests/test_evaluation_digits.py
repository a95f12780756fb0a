"""Built-in digits feature network: shipped weights, digits FD, class histograms."""
import json

import torch

from fdistill.evaluation import digits_class_histogram, digits_fd, digits_feature_extractor, digits_images
from fdistill.evaluation.digits import RECORD_PATH, digits_predict


def test_shipped_classifier_is_accurate_on_held_out_digits():
    record = json.loads(RECORD_PATH.read_text())
    assert record["held_out_accuracy"] >= 0.97
    images, labels = digits_images()
    assert float((digits_predict(images) == labels).double().mean()) >= 0.98


def test_digits_fd_is_zero_on_the_dataset_and_large_on_noise():
    images, labels = digits_images()
    assert abs(digits_fd(images)) < 1e-6
    # Upsampled copies are area-downsampled back to the same 8x8 grid: same FD; RGB is averaged to gray.
    big = torch.nn.functional.interpolate(images, scale_factor=4, mode="nearest").repeat(1, 3, 1, 1)
    assert abs(digits_fd(big)) < 1e-6
    slightly_noisy = digits_fd(images + 0.1 * torch.randn_like(images))
    only_two_classes = digits_fd(images[labels < 2])
    uniform_noise = digits_fd(torch.rand(1000, 1, 8, 8) * 2 - 1)
    assert 0 < slightly_noisy < 5 < only_two_classes and 5 < uniform_noise


def test_class_histogram_counts_predicted_classes():
    images, labels = digits_images()
    histogram = digits_class_histogram(images)
    truth = torch.bincount(labels, minlength=10).double() / len(labels)
    assert histogram.shape == (10,) and abs(float(histogram.sum()) - 1) < 1e-12
    assert 0.5 * float((histogram - truth).abs().sum()) < 0.02
    assert float(digits_class_histogram(images[labels == 3])[3]) > 0.97


def test_feature_extractor_is_a_frozen_module_with_64_features():
    extractor = digits_feature_extractor()
    features = extractor(digits_images()[0][:5])
    assert features.shape == (5, 64) and not features.requires_grad
    assert not any(p.requires_grad for p in extractor.parameters())
