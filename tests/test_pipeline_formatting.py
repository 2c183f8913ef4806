"""Formatting: chat-template and plain prompts, and masks that cover exactly the response tokens.

References are independent of rlkd's span logic: transformers' own ``apply_chat_template(tokenize=True)`` for the
ids, and string search on the rendered text plus the fast tokenizer's offsets for which tokens are the response.
"""

from __future__ import annotations

import numpy as np
import pytest
from transformers import AutoTokenizer

from rlkd.pipeline.formatting import (
    PLAIN_FORMAT,
    ColumnMapping,
    Encoded,
    FormatError,
    Formatter,
    RowSkip,
    TemplateError,
    detect_columns,
    prompt_format_identity,
    resolve_prompt_format,
    row_to_messages,
)

END = "<|im_end|>"


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):
    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))


@pytest.fixture
def plain_tok(tiny_tokenizer_dir):
    t = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    t.chat_template = None
    return t


def targets_text(tok, enc: Encoded) -> str:
    """Decode the tokens the per-position loss mask trains on: input_ids[t+1] where loss_mask[t]."""
    loss_mask = enc.is_response[1:]
    return tok.decode(enc.input_ids[1:][loss_mask])


def reference_mask(tok, msgs) -> np.ndarray:
    """Brute force: find each assistant turn's "content<|im_end|>" in the rendered text by string search, and mark
    the tokens whose characters lie inside those spans (via the tokenizer's offsets)."""
    text = tok.apply_chat_template(msgs, tokenize=False)
    spans, at = [], 0
    for m in msgs:
        head = f"<|im_start|>{m['role']}\n"
        at = text.index(head, at) + len(head)
        if m["role"] == "assistant" and m["content"].strip():
            spans.append((at, at + len(m["content"]) + len(END)))
        at += len(m["content"])
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return np.array([any(s <= a and b <= e for s, e in spans) for a, b in enc["offset_mapping"]], dtype=bool)


# ---- chat template ------------------------------------------------------------------------------------------------

def test_chat_single_turn_ids_match_transformers_and_mask_is_response_plus_end(tok):
    msgs = [{"role": "user", "content": "What is the capital of france?"},
            {"role": "assistant", "content": "Paris is the capital."}]
    [enc] = Formatter(tok, "auto").encode_batch([msgs])
    ref_ids = tok.apply_chat_template(msgs, tokenize=True)["input_ids"]
    assert enc.input_ids.dtype == np.int32 and enc.input_ids.tolist() == list(ref_ids)
    assert targets_text(tok, enc) == "Paris is the capital." + END
    # The template's newline after <|im_end|> is the last token and is not trained.
    assert tok.decode(enc.input_ids[-1:]) == "\n" and not enc.is_response[-1]
    np.testing.assert_array_equal(enc.is_response, reference_mask(tok, msgs))


def test_chat_multi_turn_trains_every_assistant_turn(tok):
    msgs = [
        {"role": "system", "content": "You are a model."},
        {"role": "user", "content": "One question?"},
        {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two question?"},
        {"role": "assistant", "content": "Second answer, 42."},
    ]
    [enc] = Formatter(tok).encode_batch([msgs])
    assert enc.input_ids.tolist() == list(tok.apply_chat_template(msgs, tokenize=True)["input_ids"])
    np.testing.assert_array_equal(enc.is_response, reference_mask(tok, msgs))
    assert targets_text(tok, enc) == "First answer." + END + "Second answer, 42." + END


def test_chat_empty_middle_turn_not_trained_and_trailing_user_dropped(tok):
    row = {"messages": [
        {"role": "user", "content": "A?"}, {"role": "assistant", "content": ""},
        {"role": "user", "content": "B?"}, {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": "never answered"},
    ]}
    msgs = row_to_messages(row, ColumnMapping("messages", {"messages": "messages"}))
    assert [m["content"] for m in msgs][-1] == "Yes."  # the trailing user turn is gone
    [enc] = Formatter(tok).encode_batch([msgs])
    assert targets_text(tok, enc) == "Yes." + END
    np.testing.assert_array_equal(enc.is_response, reference_mask(tok, msgs))


def test_chat_batch_mixes_rows_and_matches_one_by_one(tok):
    rows = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "the answer " * i}]
        for i in range(1, 6)
    ]
    f = Formatter(tok)
    together = f.encode_batch(rows)
    for r, e in zip(rows, together):
        [alone] = f.encode_batch([r])
        np.testing.assert_array_equal(e.input_ids, alone.input_ids)
        np.testing.assert_array_equal(e.is_response, alone.is_response)
        assert targets_text(tok, e) == r[1]["content"] + END


def test_loss_on_all_trains_every_position(tok):
    msgs = [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]
    [enc] = Formatter(tok, loss_on="all").encode_batch([msgs])
    assert enc.is_response.all()


def test_boundary_merge_falls_back_to_offsets(tok):
    # The generation prompt ends with "ans" and the reply starts with "wer": tokenized together they merge
    # ("an" "swer"), so the prompt's own tokens ("an" "s") are not a prefix of the conversation's tokens.
    tok2 = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok2.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}<|im_end|>\n"
        "{% else %}<|im_start|>ans{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>ans{% endif %}"
    )
    msgs = [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "wer the question"},
            {"role": "user", "content": "R?"}, {"role": "assistant", "content": " the model"}]
    prefix_ids = tok2.apply_chat_template(msgs[:1], tokenize=True, add_generation_prompt=True)["input_ids"]
    [enc] = Formatter(tok2).encode_batch([msgs])
    assert enc.input_ids.tolist() == list(tok2.apply_chat_template(msgs, tokenize=True)["input_ids"])
    assert enc.input_ids[: len(prefix_ids)].tolist() != list(prefix_ids)  # the case the fallback exists for
    # The token straddling the first boundary ("swer") belongs to the response. The second reply starts on a token
    # boundary (" the"), so its header's last token ("s") is not trained.
    assert targets_text(tok2, enc) == "swer the question" + END + " the model" + END
    # Without offsets (slow tokenizers) such a row cannot be placed: it is skipped with a reason, not mis-masked.
    [skip] = Formatter(tok2, use_offsets=False).encode_batch([msgs])
    assert isinstance(skip, RowSkip) and skip.reason == "template_tokenization"


def test_offsets_and_prefix_tokenization_agree(tok):
    rows = [
        [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": "the answer, 7. " * i}]
        for i in range(1, 5)
    ] + [[{"role": "system", "content": "Sys."}, {"role": "user", "content": "A?"},
          {"role": "assistant", "content": " leading space"}, {"role": "user", "content": "B?"},
          {"role": "assistant", "content": "Two.\n"}]]
    fast = Formatter(tok, use_offsets=True).encode_batch(rows)
    slow = Formatter(tok, use_offsets=False).encode_batch(rows)
    for a, b, r in zip(fast, slow, rows):
        np.testing.assert_array_equal(a.input_ids, b.input_ids)
        np.testing.assert_array_equal(a.is_response, b.is_response)
        np.testing.assert_array_equal(a.is_response, reference_mask(tok, r))


# ---- templates that cannot work -----------------------------------------------------------------------------------

def _with_template(tok, template):
    t = AutoTokenizer.from_pretrained(tok.name_or_path)
    t.chat_template = template
    return t


def test_template_without_generation_prompt_is_refused_clearly(tok):
    t = _with_template(tok, "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}")
    with pytest.raises(TemplateError, match="add_generation_prompt") as e:
        Formatter(t, "chat")
    assert "--prompt-format plain" in str(e.value)


def test_template_that_is_not_prefix_consistent_is_refused(tok):
    # Renders the turns newest first: the prompt is not a prefix of the whole conversation.
    t = _with_template(tok, "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
                            "{% for m in messages | reverse %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                            "<|im_end|>\n{% endfor %}")
    with pytest.raises(TemplateError, match="prefix") as e:
        Formatter(t, "chat")
    assert "--prompt-format plain" in str(e.value)


def test_template_that_drops_assistant_content_is_refused(tok):
    t = _with_template(tok, "{% for m in messages %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ m['content'] }}"
                            "<|im_end|>\n{% else %}<|im_start|>assistant\n<|im_end|>\n{% endif %}{% endfor %}"
                            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    with pytest.raises(TemplateError, match="verbatim"):
        Formatter(t, "chat")


def test_row_level_template_exception_is_a_counted_skip(tok):
    t = _with_template(tok, tok.chat_template.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if 'forbidden' in message['content'] %}"
        "{{ raise_exception('no forbidden words') }}{% endif %}"))
    good = [{"role": "user", "content": "Fine?"}, {"role": "assistant", "content": "Yes."}]
    bad = [{"role": "user", "content": "forbidden?"}, {"role": "assistant", "content": "No."}]
    out = Formatter(t).encode_batch([good, bad, good])
    assert isinstance(out[0], Encoded) and isinstance(out[2], Encoded)
    assert isinstance(out[1], RowSkip) and out[1].reason == "template_error" and "forbidden" in out[1].detail


def test_chat_requested_without_template(plain_tok):
    assert resolve_prompt_format("auto", plain_tok) == "plain"
    with pytest.raises(TemplateError, match="no chat template"):
        Formatter(plain_tok, "chat")


# ---- plain format -------------------------------------------------------------------------------------------------

def test_plain_format_text_and_mask(plain_tok):
    msgs = [{"role": "user", "content": "What is the capital?\n\nSome context."},
            {"role": "assistant", "content": "Paris."}]
    f = Formatter(plain_tok, "auto")
    assert f.format == "plain" and f.name == PLAIN_FORMAT
    [enc] = f.encode_batch([msgs])
    assert plain_tok.decode(enc.input_ids) == (
        "### User:\nWhat is the capital?\n\nSome context.\n\n### Assistant:\nParis." + END)
    assert targets_text(plain_tok, enc) == "Paris." + END
    assert enc.is_response[-1] and not enc.is_response[0]


def test_plain_format_multi_turn(plain_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A?"},
            {"role": "assistant", "content": "One."}, {"role": "user", "content": "B?"},
            {"role": "assistant", "content": "Two."}]
    [enc] = Formatter(plain_tok, "plain").encode_batch([msgs])
    assert plain_tok.decode(enc.input_ids) == (
        "### System:\nBe brief.\n\n### User:\nA?\n\n### Assistant:\nOne." + END
        + "\n\n### User:\nB?\n\n### Assistant:\nTwo." + END)
    assert targets_text(plain_tok, enc) == "One." + END + "Two." + END


def test_plain_format_keeps_the_tokenizers_bos(tiny_tokenizer_dir):
    from tokenizers import processors

    t = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    bos = t.convert_tokens_to_ids("<|endoftext|>")
    t._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    t.chat_template = None
    [enc] = Formatter(t).encode_batch([[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo."}]])
    assert enc.input_ids[0] == bos and enc.input_ids[1] != bos and not enc.is_response[0]
    assert targets_text(t, enc) == "Yo." + END


def test_text_rows_train_everything_with_eos(tok):
    f = Formatter(tok, "plain", loss_on="all")
    [enc] = f.encode_batch(["The river model."])
    assert tok.decode(enc.input_ids) == "The river model." + END
    assert enc.is_response.all()


# ---- columns ------------------------------------------------------------------------------------------------------

class _Cols:
    def __init__(self, **kw):
        for k in ("messages", "prompt", "completion", "instruction", "context", "response", "text"):
            setattr(self, f"{k}_column", kw.get(k))


@pytest.mark.parametrize("names, kind, parts", [
    (["messages", "id"], "messages", {"messages": "messages"}),
    (["prompt", "completion"], "prompt_completion", {"prompt": "prompt", "completion": "completion"}),
    (["instruction", "context", "response", "category"], "instruction",
     {"instruction": "instruction", "context": "context", "response": "response"}),
    (["instruction", "input", "output"], "instruction",
     {"instruction": "instruction", "context": "input", "response": "output"}),
    (["instruction", "response"], "instruction", {"instruction": "instruction", "context": None, "response": "response"}),
    (["text", "meta"], "text", {"text": "text"}),
])
def test_detect_columns(names, kind, parts):
    m = detect_columns(names, _Cols())
    assert m.kind == kind and m.columns == parts


def test_detect_columns_with_mapping_options():
    m = detect_columns(["q", "a", "text"], _Cols(prompt="q", completion="a"))
    assert m.kind == "prompt_completion" and m.columns == {"prompt": "q", "completion": "a"}


def test_detect_columns_errors_list_found_and_expected():
    with pytest.raises(FormatError) as e:
        detect_columns(["question", "answer"], _Cols(), source="dataset x.jsonl")
    msg = str(e.value)
    for needle in ("question, answer", "messages", "prompt + completion", "instruction", "response or output",
                   "text", "--prompt-column", "--text-column", "x.jsonl"):
        assert needle in msg
    with pytest.raises(FormatError, match="'prompt' but no 'completion'"):
        detect_columns(["prompt", "other"], _Cols())
    with pytest.raises(FormatError, match="--response-column 'nope'"):
        detect_columns(["instruction"], _Cols(response="nope"))
    with pytest.raises(FormatError, match="different row shapes"):
        detect_columns(["a", "b"], _Cols(text="a", messages="b"))


def test_row_shapes_to_messages():
    inst = ColumnMapping("instruction", {"instruction": "i", "context": "c", "response": "r"})
    assert row_to_messages({"i": "Do it.", "c": "With this.", "r": "Done."}, inst) == [
        {"role": "user", "content": "Do it.\n\nWith this."}, {"role": "assistant", "content": "Done."}]
    assert row_to_messages({"i": "Do it.", "c": None, "r": "Done."}, inst)[0]["content"] == "Do it."
    assert row_to_messages({"i": "Do it.", "c": "  ", "r": "Done."}, inst)[0]["content"] == "Do it."
    with pytest.raises(RowSkip) as e:
        row_to_messages({"i": "Do it.", "c": "", "r": "  "}, inst)
    assert e.value.reason == "empty_response"
    pc = ColumnMapping("prompt_completion", {"prompt": "p", "completion": "c"})
    convo = row_to_messages({"p": [{"role": "user", "content": "Hi"}], "c": [{"role": "assistant", "content": "Yo"}]},
                            pc)
    assert convo == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
    sharegpt = ColumnMapping("messages", {"messages": "m"})
    assert row_to_messages({"m": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]}, sharegpt) == convo
    with pytest.raises(RowSkip) as e:
        row_to_messages({"m": [{"role": "user", "content": "Hi"}]}, sharegpt)
    assert e.value.reason == "no_assistant_turn"
    with pytest.raises(RowSkip) as e:
        row_to_messages({"m": [{"role": "wizard", "content": "Hi"}]}, sharegpt)
    assert e.value.reason == "bad_value" and "wizard" in e.value.detail


def test_prompt_format_identity(tok, plain_tok):
    ident = prompt_format_identity("chat", tok)
    assert ident["name"] == "chat" and len(ident["chat_template_sha256"]) == 64
    assert prompt_format_identity("plain", plain_tok) == {"name": PLAIN_FORMAT}
