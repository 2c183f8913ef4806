"""Turn dataset rows into token ids plus a per-token "train on this" mask.

Row shapes (:func:`detect_columns`)
-----------------------------------
- ``messages``: a list of ``{role, content}`` dicts (ShareGPT ``{from, value}`` with human/gpt is accepted too);
- ``prompt`` + ``completion``: one user turn, one assistant turn (either may also be a list of messages);
- ``instruction`` + optional ``context``/``input`` + ``response``/``output`` (Dolly, Alpaca): the user turn is the
  instruction, followed by a blank line and the context when the context is not empty; the assistant turn is the
  response;
- ``text``: plain language modelling, trained on every token, never wrapped in a template.

Formats (:func:`resolve_prompt_format`)
---------------------------------------
- ``chat``: the tokenizer's own chat template. The assistant tokens are found without ``{% generation %}`` markers:
  for each assistant turn ``i`` the template renders ``messages[:i]`` with the generation prompt and
  ``messages[:i+1]`` without it; both must be prefixes of the whole rendered conversation, and the text between them
  is that turn (the strings are checked, and that the turn's content appears verbatim). Character spans become token
  spans through a fast tokenizer's offsets, from one tokenization of the whole conversation; a token straddling the
  start of a reply (header and reply merged) counts as reply. Slow tokenizers tokenize each prefix instead and
  require its tokens to be a prefix of the whole conversation's tokens (rows where they are not are skipped with
  ``template_tokenization``). Trailing whitespace-only tokens of a turn (ChatML's newline after ``<|im_end|>``) are
  not trained; the end-of-turn token itself is, because the student has to learn to stop.
- ``plain`` (``PLAIN_FORMAT`` = ``rlkd-plain-v1``), for tokenizers without a template::

      [the tokenizer's own leading special tokens, e.g. BOS]
      ### System:\\n{content}\\n\\n          (when there is a system turn)
      ### User:\\n{content}\\n\\n
      ### Assistant:\\n{content}[EOS]       (trained: content and EOS; "\\n\\n" follows before a next turn)

  Each piece is tokenized on its own and the ids concatenated, so spans are exact by construction (and match how a
  prompt is tokenized before generation). Without an EOS token nothing is appended.

The mask returned here is per *token* (``is_response[j]``: token ``j`` is trained); the cache's per-*position* mask
is ``is_response[1:]`` (position ``t`` predicts token ``t+1``, see ``rlkd/cache/schema.py``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from rlkd.errors import UserError

PLAIN_FORMAT = "rlkd-plain-v1"
"""Name of the plain format above, recorded in the manifest. Change the name if the format ever changes."""

PLAIN_HEADERS = {"system": "### System:\n", "user": "### User:\n", "assistant": "### Assistant:\n"}
PLAIN_TURN_SEPARATOR = "\n\n"

KINDS = ("messages", "prompt_completion", "instruction", "text")

_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "user": "user",
                 "assistant": "assistant", "system": "system"}


class FormatError(UserError, ValueError):
    """The dataset's columns or the tokenizer's template cannot give what is needed. The message says what to do."""


class TemplateError(FormatError):
    """The chat template does not let rlkd find the assistant tokens."""


class RowSkip(Exception):
    """A single row cannot be used; ``reason`` is a short counter key, ``detail`` says why."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ---- columns ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ColumnMapping:
    """Which row shape a dataset has and which column plays each part."""

    kind: str
    """One of KINDS."""
    columns: dict = field(default_factory=dict)
    """part -> column name; parts: messages | prompt, completion | instruction, context (optional), response | text."""

    @property
    def used_columns(self) -> list[str]:
        return [c for c in self.columns.values() if c is not None]

    def as_dict(self) -> dict:
        return {"kind": self.kind, **{k: v for k, v in self.columns.items() if v is not None}}


_MAPPING_HELP = (
    "Expected one of these column sets:\n"
    "  - messages                                   (a list of {role, content})\n"
    "  - prompt + completion\n"
    "  - instruction [+ context or input] + response or output   (Dolly, Alpaca)\n"
    "  - text                                       (plain language modelling, loss on every token)\n"
    "Map other names with --messages-column, --prompt-column/--completion-column, "
    "--instruction-column/--context-column/--response-column, or --text-column."
)

_FAMILIES = {
    "messages": ("messages_column",),
    "prompt_completion": ("prompt_column", "completion_column"),
    "instruction": ("instruction_column", "context_column", "response_column"),
    "text": ("text_column",),
}


def detect_columns(column_names: Sequence[str], cfg: Any, *, source: str = "the dataset") -> ColumnMapping:
    """Pick the row shape from the columns and the ``*_column`` options of ``cfg`` (options win over names).

    Raises :class:`FormatError` listing the columns found, the sets expected and the mapping options.
    """
    names = list(column_names)
    have = set(names)
    found = ", ".join(names) if names else "(none)"
    opt = {o: getattr(cfg, o, None) for fam in _FAMILIES.values() for o in fam}
    problems = [
        f"--{o.replace('_', '-')} {v!r}: {source} has no such column" for o, v in opt.items() if v and v not in have
    ]
    if problems:
        raise FormatError("\n".join(problems) + f"\nColumns found in {source}: {found}.\n{_MAPPING_HELP}")
    chosen = [kind for kind, fam in _FAMILIES.items() if any(opt[o] for o in fam)]
    if len(chosen) > 1:
        given = [f"--{o.replace('_', '-')}" for kind in chosen for o in _FAMILIES[kind] if opt[o]]
        raise FormatError(
            f"column options {', '.join(given)} describe different row shapes ({', '.join(chosen)}); give the "
            f"options of one shape only.\n{_MAPPING_HELP}"
        )

    def pick(option: str, *candidates: str) -> str | None:
        if opt[option]:
            return opt[option]
        return next((c for c in candidates if c in have), None)

    def build(kind: str) -> ColumnMapping | None:
        if kind == "messages":
            col = pick("messages_column", "messages")
            return ColumnMapping(kind, {"messages": col}) if col else None
        if kind == "prompt_completion":
            p, c = pick("prompt_column", "prompt"), pick("completion_column", "completion")
            return ColumnMapping(kind, {"prompt": p, "completion": c}) if p and c else None
        if kind == "instruction":
            i, r = pick("instruction_column", "instruction"), pick("response_column", "response", "output")
            ctx = pick("context_column", "context", "input")
            return ColumnMapping(kind, {"instruction": i, "context": ctx, "response": r}) if i and r else None
        col = pick("text_column", "text")
        return ColumnMapping(kind, {"text": col}) if col else None

    for kind in chosen or list(KINDS):
        mapping = build(kind)
        if mapping is not None:
            return mapping
    hints = []
    if chosen:
        hints.append(f"the column options chose the {chosen[0]} shape, but a required part is missing")
    if "prompt" in have and "completion" not in have:
        hints.append("found 'prompt' but no 'completion' (map it with --completion-column NAME)")
    if "instruction" in have:
        hints.append("found 'instruction' but no 'response'/'output' (map it with --response-column NAME)")
    hint = ("; ".join(hints) + ".\n") if hints else ""
    raise FormatError(f"cannot tell how to format the rows of {source}. Columns found: {found}.\n{hint}{_MAPPING_HELP}")


def _text(value: Any, what: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # multimodal-style content parts: keep the text parts
        parts = [p.get("text", "") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        if len(parts) == len(value):
            return "".join(parts)
    raise RowSkip("bad_value", f"{what} is {type(value).__name__}, expected a string")


def _messages(value: Any, what: str) -> list[dict]:
    if value is None:  # typically a file mixing row shapes: the loader fills the columns a row lacks with nulls
        raise RowSkip("bad_value", f"column {what!r} is null in this row: every row is read as a chat from {what!r}, "
                                   "so rows with other columns (mixed shapes?) need their own file")
    if not isinstance(value, list):
        raise RowSkip("bad_value", f"{what} is {type(value).__name__}, expected a list of {{role, content}}")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict):
            raise RowSkip("bad_value", f"{what}[{j}] is {type(m).__name__}, expected a {{role, content}} dict")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        norm = _ROLE_ALIASES.get(str(role).lower()) if role is not None else None
        if norm is None:
            raise RowSkip("bad_value", f"{what}[{j}] has role {role!r}; expected system, user or assistant")
        out.append({"role": norm, "content": _text(content, f"{what}[{j}].content")})
    return out


def row_to_messages(row: dict, mapping: ColumnMapping) -> list[dict] | str:
    """A row as a list of ``{role, content}`` messages, or a ``str`` for ``text`` rows. Raises :class:`RowSkip`."""
    c = mapping.columns
    if mapping.kind == "text":
        text = _text(row.get(c["text"]), c["text"])
        if not text.strip():
            raise RowSkip("empty_text", f"column {c['text']!r} is empty")
        return text
    if mapping.kind == "messages":
        msgs = _messages(row.get(c["messages"]), c["messages"])
    elif mapping.kind == "prompt_completion":
        p, comp = row.get(c["prompt"]), row.get(c["completion"])
        msgs = _messages(p, c["prompt"]) if isinstance(p, list) else [{"role": "user", "content": _text(p, c["prompt"])}]
        if isinstance(comp, list):
            msgs += _messages(comp, c["completion"])
        else:
            msgs.append({"role": "assistant", "content": _text(comp, c["completion"])})
    else:
        user = _text(row.get(c["instruction"]), c["instruction"])
        ctx = _text(row.get(c["context"]), c["context"]) if c.get("context") else ""
        if ctx.strip():
            user = f"{user}\n\n{ctx}"
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _text(row.get(c["response"]), c["response"])}]
    # Turns after the last assistant turn are never trained: drop them rather than spend teacher compute on them.
    last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
    if last is None:
        raise RowSkip("no_assistant_turn", "the conversation has no assistant turn to train on")
    msgs = msgs[: last + 1]
    if not any(m["content"].strip() for m in msgs if m["role"] == "assistant"):
        raise RowSkip("empty_response", "every assistant turn is empty")
    return msgs


# ---- formats ------------------------------------------------------------------------------------------------------

def resolve_prompt_format(prompt_format: str, tokenizer: Any) -> str:
    """``auto`` -> ``chat`` when the tokenizer has a chat template, else ``plain``. Checks that ``chat`` is possible."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    if prompt_format == "chat" and not has_template:
        raise TemplateError(
            f"--prompt-format chat: the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template. "
            f"Use --prompt-format plain (rlkd's format {PLAIN_FORMAT}) or a tokenizer that has one."
        )
    if prompt_format not in ("chat", "plain"):
        raise FormatError(f"prompt_format: {prompt_format!r} is not one of auto, chat, plain")
    return prompt_format


def prompt_format_identity(fmt: str, tokenizer: Any) -> dict:
    """What the manifest records about the format: its name, and the chat template's sha256 for ``chat``."""
    if fmt == "chat":
        template = tokenizer.chat_template
        if isinstance(template, dict):  # several named templates: the default one is used
            template = template.get("default", next(iter(template.values())))
        return {"name": "chat", "chat_template_sha256": hashlib.sha256(str(template).encode()).hexdigest()}
    return {"name": PLAIN_FORMAT}


@dataclass
class Encoded:
    """A formatted row: token ids and which tokens are trained."""

    input_ids: np.ndarray
    """(T,) int32."""
    is_response: np.ndarray
    """(T,) bool: token j is trained (the per-position loss mask is ``is_response[1:]``)."""

    @property
    def prompt_len(self) -> int:
        """Tokens before the first trained token (T when none is trained)."""
        hit = np.flatnonzero(self.is_response)
        return int(hit[0]) if hit.size else int(self.input_ids.shape[0])


class Formatter:
    """Encodes rows for one tokenizer and format. ``encode_batch`` returns an :class:`Encoded` or a :class:`RowSkip`
    per row; a template that cannot work at all raises :class:`TemplateError` at construction."""

    def __init__(self, tokenizer: Any, prompt_format: str = "auto", loss_on: str = "response",
                 use_offsets: bool | None = None):
        self.tok = tokenizer
        # Token spans from character offsets (fast tokenizers: one tokenization per row) or from tokenized prefixes.
        self.use_offsets = bool(getattr(tokenizer, "is_fast", False)) if use_offsets is None else use_offsets
        self.format = resolve_prompt_format(prompt_format, tokenizer)
        self.loss_on = loss_on
        self.name = prompt_format_identity(self.format, tokenizer)["name"]
        self.eos_id = tokenizer.eos_token_id
        self.bos_prefix = self._leading_specials()
        if self.format == "chat":
            self._probe_template()

    # ---- shared helpers -----------------------------------------------------------------------------------------

    def _leading_specials(self) -> list[int]:
        """Special ids the tokenizer itself puts before text (e.g. Llama's BOS); GPT-2-style tokenizers add none."""
        plain = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a", add_special_tokens=True)["input_ids"]
        for i in range(len(full) - len(plain) + 1):
            if full[i: i + len(plain)] == plain:
                return list(full[:i])
        return []

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def _trim_trailing_space(self, ids: Sequence[int], start: int, end: int) -> int:
        """End of span [start, end) without its trailing whitespace-only tokens (the template's newline after the
        end-of-turn token): the model is not asked to predict formatting that follows its own stop token."""
        while end > start and self.tok.decode([ids[end - 1]]).strip() == "":
            end -= 1
        return end

    def _encode_text(self, text_ids: list[int]) -> Encoded:
        ids = self.bos_prefix + list(text_ids) + ([self.eos_id] if self.eos_id is not None else [])
        arr = np.asarray(ids, dtype=np.int32)
        return Encoded(arr, np.ones(arr.shape[0], dtype=bool))

    def encode_batch(self, rows: list[list[dict] | str]) -> list[Encoded | RowSkip]:
        """Encode messages lists (and plain-text strings) in one tokenizer call per batch."""
        texts = [r for r in rows if isinstance(r, str)]
        text_ids = iter(self._ids(texts))
        convs = [r for r in rows if not isinstance(r, str)]
        conv_out = iter(self._encode_chat(convs) if self.format == "chat" else self._encode_plain(convs))
        out: list[Encoded | RowSkip] = []
        for r in rows:
            out.append(self._encode_text(next(text_ids)) if isinstance(r, str) else next(conv_out))
        if self.loss_on == "all":
            for e in out:
                if isinstance(e, Encoded):
                    e.is_response[:] = True
        return out

    # ---- plain ----------------------------------------------------------------------------------------------------

    def _encode_plain(self, convs: list[list[dict]]) -> list[Encoded | RowSkip]:
        # A piece is (text, None) for untrained text (headers, user and system turns) or (content, trained) for an
        # assistant turn, after which EOS follows. All of a batch's pieces go through one tokenizer call.
        pieces: list[list[tuple[str, bool | None]]] = []
        for msgs in convs:
            seq: list[tuple[str, bool | None]] = []
            pending = ""
            for j, m in enumerate(msgs):
                if j:
                    pending += PLAIN_TURN_SEPARATOR
                pending += PLAIN_HEADERS[m["role"]]
                if m["role"] == "assistant":
                    seq.append((pending, None))
                    seq.append((m["content"], bool(m["content"].strip())))  # an empty turn is not trained
                    pending = ""
                else:
                    pending += m["content"]
            pieces.append(seq)
        flat_ids = iter(self._ids([text for seq in pieces for text, _ in seq]))
        out: list[Encoded | RowSkip] = []
        for seq in pieces:
            ids: list[int] = list(self.bos_prefix)
            mask: list[bool] = [False] * len(ids)
            for _, trained in seq:
                t = next(flat_ids)
                ids += t
                mask += [bool(trained)] * len(t)
                if trained is not None and self.eos_id is not None:
                    ids.append(self.eos_id)  # the turn ends with EOS, trained like the content: the stop signal
                    mask.append(trained)
            out.append(Encoded(np.asarray(ids, dtype=np.int32), np.asarray(mask, dtype=bool)))
        return out

    # ---- chat -----------------------------------------------------------------------------------------------------

    def _render(self, msgs: list[dict], gen: bool) -> str:
        return self.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

    def _probe_template(self) -> None:
        """Fail before any work when the template cannot mark assistant tokens, saying why and what to do."""
        who = getattr(self.tok, "name_or_path", "") or "the tokenizer"
        fix = f"Use --prompt-format plain (rlkd's {PLAIN_FORMAT}) or give the teacher a template that has one."
        user = {"role": "user", "content": "rlkd probe question"}
        answer = {"role": "assistant", "content": "rlkd probe answer"}
        try:
            bare = self._render([user], False)
            prefix = self._render([user], True)
            full = self._render([user, answer], False)
        except Exception as e:  # jinja errors, missing template
            raise TemplateError(f"the chat template of {who!r} failed to render a user/assistant exchange: {e}. "
                                f"{fix}") from e
        if prefix == bare:
            raise TemplateError(
                f"the chat template of {who!r} ignores add_generation_prompt, so rlkd cannot tell the assistant "
                f"header from the response (the template has no generation prompt). {fix}"
            )
        if not full.startswith(prefix):
            raise TemplateError(
                f"the chat template of {who!r} does not render the prompt (with its generation prompt) as a prefix "
                f"of the whole conversation, so the assistant tokens cannot be located. {fix}"
            )
        if answer["content"] not in full[len(prefix):]:
            raise TemplateError(
                f"the chat template of {who!r} does not render the assistant's content verbatim after the "
                f"generation prompt, so the assistant tokens cannot be located. {fix}"
            )

    def _encode_chat(self, convs: list[list[dict]]) -> list[Encoded | RowSkip]:
        # Per conversation: the whole rendered text, and each assistant turn's character span (from the renders of
        # messages[:a] with the generation prompt and of messages[:a+1]); then one tokenizer call for the batch.
        plans: list[tuple[str, list[tuple[int, int, bool]], list[str]] | RowSkip] = []
        for msgs in convs:
            try:
                plans.append(self._plan(msgs))
            except RowSkip as s:
                plans.append(s)
        live = [p for p in plans if not isinstance(p, RowSkip)]
        token_spans = iter(self._spans_by_offsets(live) if self.use_offsets else self._spans_by_prefix(live))
        out: list[Encoded | RowSkip] = []
        for p in plans:
            if isinstance(p, RowSkip):
                out.append(p)
                continue
            got = next(token_spans)
            if isinstance(got, RowSkip):
                out.append(got)
                continue
            ids, bounds = got
            mask = np.zeros(len(ids), dtype=bool)
            for j, (_, _, trained) in enumerate(p[1]):
                if trained:
                    start = bounds[2 * j]
                    mask[start: self._trim_trailing_space(ids, start, bounds[2 * j + 1])] = True
            out.append(Encoded(np.asarray(ids, dtype=np.int32), mask))
        return out

    def _spans_by_offsets(self, plans) -> list[tuple[list[int], list[int]]]:
        """Fast tokenizers: tokenize each whole conversation once and map the turns' character boundaries to token
        indices with the offsets. A boundary falls before the first token that ends after it, so a token straddling
        the start of a reply (the template's header merged with the reply's first characters) is trained."""
        texts = [p[0] for p in plans]
        if not texts:
            return []
        backend = self.tok.backend_tokenizer
        if backend.truncation is None and backend.padding is None:
            # The Rust tokenizer directly: the same ids as tokenizer(text, add_special_tokens=False), without
            # transformers' per-call conversion (which costs more than the tokenization itself here).
            encs = backend.encode_batch(texts, add_special_tokens=False)
            pairs = [(e.ids, e.offsets) for e in encs]
        else:
            enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
            pairs = list(zip(enc["input_ids"], enc["offset_mapping"]))
        out = []
        for (ids, offsets), (_, spans, _) in zip(pairs, plans):
            ends = np.fromiter((e for _, e in offsets), dtype=np.int64, count=len(offsets))
            chars = [c for s, e, _ in spans for c in (s, e)]
            out.append((list(ids), np.searchsorted(ends, chars, side="right").tolist()))
        return out

    def _spans_by_prefix(self, plans) -> list[tuple[list[int], list[int]] | RowSkip]:
        """Slow tokenizers (no offsets): tokenize each boundary's prefix too; its tokens must be a prefix of the
        whole conversation's tokens, which fails when the tokenizer merges tokens across the boundary."""
        texts: list[str] = []
        for full, _, prefixes in plans:
            texts += [full, *prefixes]
        all_ids = iter(self._ids(texts))
        out: list[tuple[list[int], list[int]] | RowSkip] = []
        for _, _, prefixes in plans:
            ids = list(next(all_ids))
            prefix_ids = [list(next(all_ids)) for _ in prefixes]
            if all(ids[: len(x)] == x for x in prefix_ids):
                out.append((ids, [len(x) for x in prefix_ids]))
            else:
                out.append(RowSkip("template_tokenization", "the tokenizer merges tokens across an assistant turn's "
                                   "boundary and, not being a fast tokenizer, gives no character offsets to place it; "
                                   "use a fast tokenizer or --prompt-format plain"))
        return out

    def _plan(self, msgs: list[dict]) -> tuple[str, list[tuple[int, int, bool]], list[str]]:
        """Render ``msgs`` and find each assistant turn's character span. Raises :class:`RowSkip`."""
        try:
            full = self._render(msgs, False)
            spans: list[tuple[int, int, bool]] = []
            prefixes: list[str] = []
            for a, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                if a == 0:
                    raise RowSkip("assistant_first", "the conversation starts with an assistant turn: there is no "
                                  "prompt to render a generation prompt for")
                pre = self._render(msgs[:a], True)
                end = full if a == len(msgs) - 1 else self._render(msgs[: a + 1], False)
                if not (full.startswith(end) and end.startswith(pre)):
                    raise RowSkip("template_not_prefix", f"turn {a}: the template does not render the conversation "
                                  "prefix as a prefix of the whole conversation")
                if m["content"].strip() not in end[len(pre):]:
                    raise RowSkip("template_content", f"turn {a}: the assistant content is not rendered verbatim")
                spans.append((len(pre), len(end), bool(m["content"].strip())))
                prefixes += [pre, end]
        except RowSkip:
            raise
        except Exception as e:  # jinja raise_exception(), e.g. "roles must alternate"
            raise RowSkip("template_error", str(e)) from e
        return full, spans, prefixes
