"""Tokenizer identity: a hash that says whether two tokenizers map text to the same ids.

Stage 1 records it in the manifest; stage 2 refuses a student whose tokenizer hashes differently, because a cached
teacher id is only meaningful in the teacher's vocabulary.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from rlkd.errors import UserError


class TokenizerMismatchError(UserError, ValueError):
    """The student's tokenizer is not the one the cache was written with."""


def tokenizer_identity(tokenizer: Any) -> dict:
    """Describe ``tokenizer`` (an HF tokenizer) by a sha256 of its vocabulary and special tokens.

    The chat template is deliberately not hashed: it changes formatting, not the meaning of ids.
    """
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {
        "bos": tokenizer.bos_token,
        "eos": tokenizer.eos_token,
        "pad": tokenizer.pad_token,
        "unk": tokenizer.unk_token,
        "added": sorted(str(t) for t in tokenizer.all_special_tokens),
    }
    payload = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return {
        "sha256": hashlib.sha256(payload.encode("utf-8")).hexdigest(),
        "vocab_size": len(vocab),
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
    }


def check_tokenizer_compatible(tokenizer: Any, manifest_identity: dict, *, where: str = "the cache") -> None:
    """Raise :class:`TokenizerMismatchError` unless ``tokenizer`` matches the identity stored in a manifest."""
    mine = tokenizer_identity(tokenizer)
    if mine["sha256"] != manifest_identity.get("sha256"):
        raise TokenizerMismatchError(
            f"tokenizer mismatch: {where} was written with tokenizer {manifest_identity.get('name_or_path')!r} "
            f"(vocab {manifest_identity.get('vocab_size')}, sha256 {str(manifest_identity.get('sha256'))[:12]}…), "
            f"but the student's tokenizer {mine['name_or_path']!r} has vocab {mine['vocab_size']}, "
            f"sha256 {mine['sha256'][:12]}…. Cached teacher ids only mean something in the teacher's vocabulary: "
            "use a student that shares the teacher's tokenizer (e.g. `rlkd make-student --from TEACHER`)."
        )
