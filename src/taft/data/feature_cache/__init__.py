"""On-disk cache of frozen-trunk features, one entry per (key, data content, preprocessing, dtype).

The trunk is frozen and its input does not depend on the tangent parameters, so its output for an example
can be computed once and reused by every epoch, shard and run. An entry lives in
`<root>/<sha256 of the entry key>/` (root: `cache_dir()/"features"`), where the entry key is the caller's
`key` (backbone fingerprint, tangent blocks, ...) plus `dataset.content_hash()`, the dataset's
`transform_id()` (preprocessing) and the storage dtype. Any change there is a different directory, i.e. a
miss; stale entries are removed with `FeatureCache.clear()`.

Files of an entry:
  features.npy   (n, *feature_shape) float32 or float16, written in place through a memmap, chunk by chunk
  progress.json  chunk size and the chunks already written and flushed (an interrupted build resumes there;
                 the chunk size of the first attempt is kept, so a resumed build equals an uninterrupted one)
  labels.npy, ids.json
  lengths.npy    text only: real tokens per example. Rows are as long as the dataset's longest example (its
                 `width`); each batch runs the trunk padded to its own longest example only, and the positions
                 past an example's length hold zeros (they are masked out downstream anyway)
  meta.json      written atomically last: the completion marker. Without it an entry is never read as
                 complete. Its "device" (where the trunk ran) is information only: entries load anywhere. Its
                 "sha256" records every file's SHA-256 (entries written before it have none).
A complete entry is checked when it is loaded (`reader`: sizes always, checksums with features.npy hashed up to
`reader.VERIFY_LIMIT` bytes or with `verify=True`); a damaged one is a miss for `load` and is rebuilt by
`build_or_load` with a warning. A filesystem that refuses a write (full disk, unwritable directory) is a one-line
`TaftError` naming the file; the entry stays incomplete and the next build resumes it.
Builds of one entry by several processes are serialised with a file lock (POSIX). With a CUDA `device` the loader
pins its batches and copies them asynchronously. A trunk run under autocast gives other features: its callers
(`taft.data.cache_features`) put the autocast setting into `key`; the stored dtype is always `dtype`.

Modules: `key` (the entry key and its digest), `writer` (the resumable, locked build), `reader`
(`CachedFeatures`), `cache` (`FeatureCache`: load, build or clear), `entries` (what the whole cache directory
holds, for `taft cache list` / `clear`).
"""

from taft.data.feature_cache.cache import FeatureCache, build_or_load_features
from taft.data.feature_cache.entries import CacheEntry, cache_entries, clear_cache, human_size, parse_age
from taft.data.feature_cache.key import LabelledDataset, entry_digest, entry_key
from taft.data.feature_cache.reader import CachedFeatures

__all__ = ["CacheEntry", "CachedFeatures", "FeatureCache", "LabelledDataset", "build_or_load_features",
           "cache_entries", "clear_cache", "entry_digest", "entry_key", "human_size", "parse_age"]
