"""Input pipeline: sources (embedded synthetic corpus, text files, ArrayRecord), tokenizers,
packing and the grain dataset the trainer iterates. Knows nothing of the model."""

from deepjax.data.corpus import DOMAINS, SyntheticCorpus
from deepjax.data.packing import pack_documents
from deepjax.data.pipeline import EncodeDocument, check_tokenizer, make_dataset
from deepjax.data.sources import ArrayRecordSource, TextFileSource
from deepjax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "DOMAINS", "SyntheticCorpus", "TextFileSource", "ArrayRecordSource",
    "Tokenizer", "ByteTokenizer", "HFTokenizer", "load_tokenizer",
    "EncodeDocument", "check_tokenizer", "pack_documents", "make_dataset",
]
