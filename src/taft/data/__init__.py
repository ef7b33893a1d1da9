"""Data: labelled image and text datasets, deterministic preprocessing, id-based splits, the trunk-feature cache
and `cache_features` (a backbone's trunk features through it)."""

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
from taft.data.source import DataSource
from taft.data.split import split_dataset, train_val_split
from taft.data.text import TextDataset, rotten_tomatoes, text_table
from taft.data.transforms import ImageTransform, preprocess_id
from taft.data.trunk_features import cache_features, feature_key, trunk_key

__all__ = [
    "FASHION_MNIST_CLASSES", "FASHION_MNIST_DIR", "IMAGE_EXTENSIONS", "CachedFeatures", "DataSource", "FeatureCache",
    "ImageDataset", "ImageRecord", "ImageTransform", "TextDataset", "build_or_load_features", "cache_features",
    "entry_key", "feature_key", "trunk_key",
    "fashion_mnist", "image_folder", "preprocess_id", "read_idx", "rotten_tomatoes", "split_dataset", "text_table",
    "train_val_split",
]
