"""`rlkd inspect` user errors: each is one clear line that names the flag at fault, exit code 1 or 2, no traceback."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from rlkd.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_tokenizer_dir):
    """A 3-row cache over the tiny tokenizer (row 0 has 40 positions) and a student with a 256-id vocabulary."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from rlkd.cache import CacheWriter, tokenizer_identity
    from tests.cache_helpers import full_logprobs, row_from_logprobs

    tmp = tmp_path_factory.mktemp("inspect-errors")
    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    rng = np.random.default_rng(0)
    meta = {"teacher": {"name_or_path": str(tiny_tokenizer_dir), "vocab_size": len(tok)},
            "tokenizer": tokenizer_identity(tok), "dataset": {"name": "random"}, "config": {},
            "logprobs_mode": "raw_logprobs", "temperature": 1.0, "engine": "numpy"}
    with CacheWriter(tmp / "cache", meta, k=8, codec="fp32") as w:
        for i, T in enumerate((41, 12, 20)):
            ids = rng.integers(0, len(tok), size=T).astype(np.int32)
            ids[0] = len(tok) - 1  # a cached id the small student cannot index
            w.write(row_from_logprobs(full_logprobs(rng, T - 1, len(tok)), ids, i, 8))
    small = tmp / "small-vocab"
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, head_dim=32)).save_pretrained(str(small))
    tok.save_pretrained(str(small))
    (tmp / "a-folder").mkdir()
    (tmp / "a-file").write_text("x")
    return tmp


CASES = [
    # (id, args after CACHE, exit code, flag, another phrase the message must hold)
    ("positions-past-the-row", ["--row", "0", "--positions", "100:200"], 1, "--positions", "row 0 has 40 positions"),
    ("positions-empty", ["--row", "1", "--positions", "5:5"], 1, "--positions", "row 1 has 11 positions"),
    ("positions-not-a-slice", ["--row", "0", "--positions", "a:b"], 1, "--positions", "integers"),
    ("row-out-of-range", ["--row", "99"], 1, "--row", "the cache has 3 rows"),
    ("html-folder", ["--html", "{tmp}/a-folder"], 2, "--html", "is a folder"),
    ("html-no-such-folder", ["--html", "{tmp}/missing/report.html"], 2, "--html", "does not exist"),
    ("html-under-a-file", ["--html", "{tmp}/a-file/report.html"], 2, "--html", "does not exist"),
    ("html-unwritable", ["--html", "/proc/rlkd-report.html"], 1, "--html", "cannot write"),
    ("rows-out-of-range", ["--html", "{tmp}/r.html", "--rows", "0,7"], 1, "--rows", "out of range"),
    ("student-missing", ["--student", "{tmp}/no-such-student"], 1, "--student", "no such folder"),
    ("student-small-vocab", ["--student", "{tmp}/small-vocab"], 1, "--student", "vocabulary of 256 ids"),
    ("tail-without-student", ["--tail", "renormalize"], 2, "--tail", "give --student too"),
    ("tail-unknown", ["--student", "{tmp}/small-vocab", "--tail", "dense"], 2, "--tail", "renormalize"),
    ("top-zero", ["--row", "0", "--top", "0"], 2, "--top", ">= 1"),
    ("sample-zero", ["--sample", "0"], 2, "--sample", "positive"),
]


@pytest.mark.parametrize("args, code, flag, phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_inspect_user_errors(setup, args, code, flag, phrase):
    args = [a.replace("{tmp}", str(setup)) for a in args]
    res = CliRunner().invoke(main, ["inspect", str(setup / "cache"), *args])
    assert isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}"  # click's exit, not a crash
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    assert flag in res.output and phrase in res.output, res.output
    message = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert len(message) == 1, res.output  # one line that says it
