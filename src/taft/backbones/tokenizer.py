"""A BERT WordPiece tokenizer read from a Hugging Face `tokenizer.json` (the `tokenizers` library, no hub).

Every text becomes `[CLS] tokens [SEP]`, truncated to `max_length` tokens ([SEP] stays last) and padded with the
id of "[PAD]" (the file's own padding setting is ignored). `sha256` names the file's bytes, so `preprocess`
identifies the tokenization exactly (feature-cache keys, checkpoints).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from taft.backbones.base import TextPreprocess, TokenBatch
from taft.errors import TaftError

PAD_TOKEN = "[PAD]"


class TextTokenizer:
    """`tokenizer.json` at `path`, truncating to `max_length` (an int ≥ 2) tokens including [CLS] and [SEP].
    Raises `TaftError` if the file is missing or not a tokenizer with a [PAD] token that adds [CLS] ... [SEP]."""

    def __init__(self, path: str | Path, max_length: int) -> None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise TaftError(f"max_length must be an integer ≥ 2 ([CLS] and [SEP] included), got {max_length!r}")
        self.path = Path(path)
        self.max_length = max_length
        try:
            raw = self.path.read_bytes()
            tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
        except OSError as e:
            raise TaftError(f"cannot read tokenizer file {self.path}: {e}") from e
        except Exception as e:  # tokenizers raises a bare Exception for malformed JSON
            raise TaftError(f"{self.path} is not a tokenizer.json file: {e}") from e
        self.sha256 = hashlib.sha256(raw).hexdigest()
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length)
        self._setup(tokenizer)

    def _setup(self, tokenizer: Tokenizer) -> None:
        pad_id = tokenizer.token_to_id(PAD_TOKEN)
        if pad_id is None:
            raise TaftError(f"tokenizer {self.path} has no {PAD_TOKEN} token in its vocabulary")
        special = tokenizer.encode("a").special_tokens_mask
        if len(special) < 2 or not (special[0] and special[-1]):
            raise TaftError(f"tokenizer {self.path} does not add [CLS] ... [SEP] around a text (no BERT "
                            "post-processor)")
        self._tokenizer = tokenizer
        self.pad_id: int = pad_id

    @property
    def preprocess(self) -> TextPreprocess:
        return TextPreprocess(self.sha256, self.max_length, self.pad_id)

    def encode(self, texts: Sequence[str]) -> tuple[list[list[int]], list[int]]:
        """(token ids of each text, [CLS] and [SEP] included; indices of the texts that were truncated).
        Raises `TaftError` naming the index of a text that is not a string or is empty / whitespace only."""
        ids: list[list[int]] = []
        truncated: list[int] = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TaftError(f"text {i} is a {type(text).__name__}, not a string")
            if not text.strip():
                raise TaftError(f"text {i} is empty or whitespace only")
            encoding = self._tokenizer.encode(text)
            ids.append(encoding.ids)
            if encoding.overflowing:
                truncated.append(i)
        return ids, truncated

    def pad(self, token_ids: Sequence[Sequence[int]], width: int | None = None) -> TokenBatch:
        """Pads `token_ids` (each at most `width` long) with `pad_id` to `width` (default: the longest) and masks
        the padding."""
        width = max((len(t) for t in token_ids), default=0) if width is None else width
        ids = torch.full((len(token_ids), width), self.pad_id, dtype=torch.int64)
        mask = torch.zeros((len(token_ids), width), dtype=torch.bool)
        for row, t in enumerate(token_ids):
            ids[row, :len(t)] = torch.as_tensor(t, dtype=torch.int64)
            mask[row, :len(t)] = True
        return TokenBatch(ids, mask)

    def batch(self, texts: Sequence[str]) -> TokenBatch:
        """`texts` tokenized and padded to the longest; warns when any were truncated to `max_length`."""
        token_ids, truncated = self.encode(texts)
        if truncated:
            warnings.warn(f"{len(truncated)} of {len(token_ids)} texts are longer than max_length="
                          f"{self.max_length} tokens and were truncated", stacklevel=2)
        return self.pad(token_ids)

    def __getstate__(self) -> dict:
        return {"path": str(self.path), "max_length": self.max_length, "sha256": self.sha256,
                "json": self._tokenizer.to_str()}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self.max_length = state["max_length"]
        self.sha256 = state["sha256"]
        self._setup(Tokenizer.from_str(state["json"]))

    def __repr__(self) -> str:
        return f"TextTokenizer({str(self.path)!r}, max_length={self.max_length}, sha256={self.sha256[:12]})"
