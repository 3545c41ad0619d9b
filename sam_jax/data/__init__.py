"""Datasets for training and evaluation: sources (synthetic, sa1b, coco, tfds) -> one example
format -> deterministic, resumable training batches. See `spec.py` for the dataset spec strings."""

from sam_jax.data.pipeline import TrainIterator, make_train_iterator, make_training_example
from sam_jax.data.sources import iterate_examples, open_source
from sam_jax.data.spec import DatasetSpec, parse_dataset_spec
from sam_jax.data.synthetic import SyntheticConfig, SyntheticDataset, synthetic_example

__all__ = [
    "DatasetSpec",
    "SyntheticConfig",
    "SyntheticDataset",
    "TrainIterator",
    "iterate_examples",
    "make_train_iterator",
    "make_training_example",
    "open_source",
    "parse_dataset_spec",
    "synthetic_example",
]
