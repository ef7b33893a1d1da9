"""Data: labelled image datasets, deterministic preprocessing, id-based splits and the trunk-feature cache."""

from taft.data.feature_cache import CachedFeatures, FeatureCache, build_or_load_features, entry_key
from taft.data.images import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    IMAGE_EXTENSIONS,
    ImageDataset,
    ImageRecord,
    fashion_mnist,
    image_folder,
    read_idx,
)
from taft.data.split import split_dataset, train_val_split
from taft.data.text import TextDataset, rotten_tomatoes, text_table
from taft.data.transforms import ImageTransform, preprocess_id

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_EXTENSIONS", "CachedFeatures", "FeatureCache",
    "ImageDataset", "ImageRecord", "ImageTransform", "TextDataset", "build_or_load_features", "entry_key",
    "fashion_mnist", "image_folder", "preprocess_id", "read_idx", "rotten_tomatoes", "split_dataset", "text_table",
    "train_val_split",
]
