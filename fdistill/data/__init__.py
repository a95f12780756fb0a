"""Data sources (``data`` config group): built-in digits and Gaussian mixtures, image folders, Hugging Face datasets,
captioned images and prompt files (text-to-image), preference pairs (``fdistill.data.preference``).

Every source is a ``DataSource``: ``.dataset`` (items are dicts of tensors), ``.sample_shape``, ``.num_classes`` and
``.loader(batch_size, seed, start_step, rank, world_size)``, a deterministic, resumable infinite batch stream.
"""
from .base import DataSource, StepBatchSampler, TensorDictDataset, epoch_permutation, global_batch_indices
from .captions import CaptionedImages, captioned_shapes, prompt_file
from .builtin import GMM_PRESETS, digits, digits_images, gaussian_mixture
from .images import IMAGE_EXTENSIONS, BadImageError, LazyImageDataset, hf_images, image_folder

__all__ = [
    "CaptionedImages", "captioned_shapes", "prompt_file",
    "DataSource", "StepBatchSampler", "TensorDictDataset", "epoch_permutation", "global_batch_indices",
    "GMM_PRESETS", "digits", "digits_images", "gaussian_mixture",
    "IMAGE_EXTENSIONS", "BadImageError", "LazyImageDataset", "hf_images", "image_folder",
]
