"""Report text as token ids, with Hugging Face's `tokenizers`.

The default tokenizer is byte-level without merges: every UTF-8 byte is one token, so any language
is covered, and its vocabulary is fixed (259 ids), learned from no report: nothing of a site's text
is in it, which is what a federation needs. A `tokenizer.json` file (any `tokenizers` model, e.g. a
multilingual WordPiece) can replace it for local fine-tuning; it must name padding, start and end tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

__all__ = ["ReportTokenizer", "byte_level_tokenizer"]

SPECIALS = {
    "pad": ("<pad>", "[PAD]"),
    "bos": ("<bos>", "<s>", "[CLS]", "[BOS]"),
    "eos": ("<eos>", "</s>", "[SEP]", "[EOS]"),
}


def byte_level_tokenizer() -> Tokenizer:
    """Ids 0-2: `<pad>`, `<bos>`, `<eos>`; ids 3-258: the 256 bytes (GPT-2's byte-to-character map)."""
    names = ["<pad>", "<bos>", "<eos>", *pre_tokenizers.ByteLevel.alphabet()]
    tok = Tokenizer(models.BPE(vocab={n: i for i, n in enumerate(names[:3] + sorted(names[3:], key=ord))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(names[:3])
    return tok


class ReportTokenizer:
    """Reports <-> fixed-length id tensors `[max_tokens]`: `<bos>`, the text's ids, `<eos>`, then padding.

    Args:
        tokenizer: a `tokenizers.Tokenizer`, or its JSON (`Tokenizer.to_str()`, as checkpoints keep it).
        max_tokens: ids per report including `<bos>` and `<eos>`; longer reports are cut.

    Raises:
        ValueError: the tokenizer has no padding, start or end token, or max_tokens < 3.
    """

    def __init__(self, tokenizer: Tokenizer | str | None = None, max_tokens: int = 256) -> None:
        if tokenizer is None:
            tokenizer = byte_level_tokenizer()
        # a copy: padding and truncation are ours (a file's own would put padding before <eos>), and special tokens
        # written in a report ("<eos>") are text, not control ids
        self.tok = Tokenizer.from_str(tokenizer if isinstance(tokenizer, str) else tokenizer.to_str())
        self.tok.no_padding()
        self.tok.no_truncation()
        self.tok.encode_special_tokens = True
        if max_tokens < 3:
            raise ValueError(f"max_tokens={max_tokens}: a report needs >= 3 ids (start, text, end)")
        self.max_tokens = max_tokens
        vocab = self.tok.get_vocab(with_added_tokens=True)
        ids = {}
        for role, names in SPECIALS.items():
            found = [vocab[n] for n in names if n in vocab]
            if not found:
                raise ValueError(f"the tokenizer has no {role} token (looked for {', '.join(names)})")
            ids[role] = found[0]
        self.pad, self.bos, self.eos = ids["pad"], ids["bos"], ids["eos"]

    @classmethod
    def from_file(cls, path: str | Path, max_tokens: int) -> ReportTokenizer:
        """A `tokenizer.json` written by `tokenizers` (or `transformers`' fast tokenizers).

        Raises:
            FileNotFoundError: no such file. ValueError: not a tokenizer file, or no special tokens.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"model.tokenizer: {path} is not a file (a tokenizer.json; leave it empty for the byte-level tokenizer)"
            )
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - tokenizers raises its own Exception type
            raise ValueError(f"model.tokenizer: {path} is not a tokenizers JSON file ({type(exc).__name__})") from None
        try:
            return cls(tok, max_tokens)
        except ValueError as exc:
            raise ValueError(f"model.tokenizer: {path}: {exc}") from None

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    def to_str(self) -> str:
        return self.tok.to_str()

    def length(self, text: str) -> int:
        """Ids the report needs with `<bos>` and `<eos>` (more than max_tokens: it is cut)."""
        return len(self.tok.encode(text, add_special_tokens=False).ids) + 2

    def encode(self, text: str) -> torch.Tensor:
        """`[max_tokens]` int64: `<bos>`, the text's ids (cut to fit), `<eos>`, padding."""
        ids = [self.bos, *self.tok.encode(text, add_special_tokens=False).ids[: self.max_tokens - 2], self.eos]
        return torch.tensor(ids + [self.pad] * (self.max_tokens - len(ids)), dtype=torch.long)

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        """The text of generated ids, up to the first `<eos>` (a leading `<bos>` and padding are skipped)."""
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        if self.eos in ids:
            ids = ids[: ids.index(self.eos)]
        return self.tok.decode([i for i in ids if i not in (self.pad, self.bos)], skip_special_tokens=True).strip()
