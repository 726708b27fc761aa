"""Data pipeline: records, decoding, augmentation, datasets, batching, resumable sampling.

Imports without Lightning; the LightningDataModule that wires these into training is
:class:`unialign.training.datamodule.RetrievalDataModule`."""

from unialign.data.collate import Collator
from unialign.data.datasets import (
    MixedIterableDataset,
    PairDataset,
    RecordStream,
    ShardStream,
    bad_marker,
    build_train_dataset,
    is_bad,
)
from unialign.data.images import ImageLoadError, load_image
from unialign.data.records import (
    DataError,
    Record,
    RecordSet,
    RetrievalSet,
    read_karpathy,
    read_karpathy_eval,
    read_manifest,
    retrieval_set,
    stable_id,
)
from unialign.data.sampler import ResumableSampler, derive_seed
from unialign.data.synthetic import make_synthetic_karpathy, write_manifest, write_webdataset_shards
from unialign.data.transforms import PixelNormalizer, build_image_transform

__all__ = [
    "Collator",
    "DataError",
    "ImageLoadError",
    "MixedIterableDataset",
    "PairDataset",
    "PixelNormalizer",
    "Record",
    "RecordSet",
    "RecordStream",
    "ResumableSampler",
    "RetrievalSet",
    "ShardStream",
    "bad_marker",
    "build_image_transform",
    "build_train_dataset",
    "derive_seed",
    "is_bad",
    "load_image",
    "make_synthetic_karpathy",
    "read_karpathy",
    "read_karpathy_eval",
    "read_manifest",
    "retrieval_set",
    "stable_id",
    "write_manifest",
    "write_webdataset_shards",
]
