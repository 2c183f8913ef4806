"""The teacher cache: zstd Parquet shards of per-position top-k teacher log-probs, plus a JSON manifest.

Stage 1 writes it with :class:`CacheWriter`; stage 2 streams it with :class:`CacheReader`; ``rlkd verify`` runs
:func:`verify_cache`. The row contract and position alignment are in :mod:`rlkd.cache.schema`, the codecs and
columns in :mod:`rlkd.cache.codec`, the manifest in :mod:`rlkd.cache.manifest`.
"""

from rlkd.cache.codec import adaptive_counts, decode_logprobs, encode_logprobs, roundtrip
from rlkd.cache.identity import TokenizerMismatchError, check_tokenizer_compatible, tokenizer_identity
from rlkd.cache.manifest import (
    CacheCorruptError,
    CacheDirError,
    CacheLockedError,
    CacheMismatchError,
    read_manifest,
)
from rlkd.cache.reader import CacheReader
from rlkd.cache.schema import CODECS, FORMAT_VERSION, MAX_K, TeacherRow, make_row_id, row_problems
from rlkd.cache.verify import repair_cache, verify_cache, verify_report
from rlkd.cache.writer import CacheWriter

__all__ = [
    "CODECS", "FORMAT_VERSION", "MAX_K", "CacheCorruptError", "CacheDirError", "CacheLockedError", "CacheMismatchError",
    "CacheReader", "CacheWriter", "TeacherRow", "TokenizerMismatchError", "adaptive_counts",
    "check_tokenizer_compatible", "decode_logprobs", "encode_logprobs", "make_row_id", "read_manifest",
    "repair_cache", "roundtrip", "row_problems", "tokenizer_identity", "verify_cache", "verify_report",
]
