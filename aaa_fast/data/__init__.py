"""Datasets as uint8 tensors, scenario builders (meta split, long tail, label noise), batched
augmentation on the training device."""
from .augment import random_crop_flip
from .datasets import CLASS_NAMES, DATASETS, Dataset, DatasetError, load_cifar, load_dataset, load_fashion_mnist
from .scenarios import (NOISE_KINDS, Scenario, build_scenario, class_balanced_subset, corrupt_labels, make_long_tailed,
                        split_meta)

__all__ = ["CLASS_NAMES", "DATASETS", "Dataset", "DatasetError", "NOISE_KINDS", "Scenario", "build_scenario", "class_balanced_subset",
           "corrupt_labels",
           "load_cifar", "load_dataset", "load_fashion_mnist", "make_long_tailed", "random_crop_flip", "split_meta"]
