"""Text tokenizers for image–text models, built on the ``tokenizers`` library.

* a checkpoint's ``tokenizer.json`` (CLIP's BPE with its ``</w>`` word ends, SigLIP's, or the small model's);
* CLIP's ``vocab.json`` + ``merges.txt`` built as transformers' ``CLIPConverter`` builds them (NFC, whitespace
  runs to one space, lowercase; words, single digits and punctuation runs split; byte-level BPE with ``</w>``);
* :func:`char_tokenizer`: the small model's own character-level vocabulary, written as a ``tokenizer.json``.

``batch(texts)`` gives the token ids [B,P] a text tower takes: start and end tokens as the checkpoint's
tokenizer adds them (added here when its post-processor does not), truncated to the context with the end token
kept last, padded on the right (CLIP) or to the whole context (SigLIP).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from mechscope.core.errors import MechscopeError

CLIP_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


class ClipTokenizer:
    def __init__(self, backend, n_ctx: int, bos_id: int | None, eos_id: int | None, pad_id: int | None,
                 pad_to_context: bool = False) -> None:  # fmt: skip
        self.backend = backend
        self.n_ctx, self.bos_id, self.eos_id = n_ctx, bos_id, eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.pad_to_context = pad_to_context

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """One text's ids, with the start and end tokens, truncated to the context (the end token kept)."""
        if not isinstance(text, str):
            raise MechscopeError(f"expected a text, got {type(text).__name__}")
        enc = self.backend.encode(text, add_special_tokens=True)
        ids = list(enc.ids)
        unk = self.unknown_id
        if unk is not None and unk in ids:  # the text reads as another one: "名前" and "数字" were one prompt
            chars = sorted({text[a:b] for (a, b), i in zip(enc.offsets, ids, strict=True) if i == unk and b > a})
            shown = ", ".join(repr(c) for c in chars[:8]) + (f" and {len(chars) - 8} more" if len(chars) > 8 else "")
            raise MechscopeError(f"{text!r} has {shown or 'characters'} outside this model's vocabulary: each would "
                                 "be read as the same unknown token")  # fmt: skip
        if self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        if self.eos_id is not None and ids[-1:] != [self.eos_id]:
            ids = [*ids, self.eos_id]
        if len(ids) > self.n_ctx:
            ids = ids[: self.n_ctx - 1] + ids[-1:] if self.eos_id is not None else ids[: self.n_ctx]
        return ids

    @functools.cached_property
    def unknown_id(self) -> int | None:
        """The id the tokenizer gives what its vocabulary lacks (None: it has none, as a byte-level BPE's, or it
        is a special token the texts carry anyway); found once (a Unigram's means serialising the tokenizer)."""
        name = getattr(self.backend.model, "unk_token", None)  # WordLevel, BPE, WordPiece
        i = self.backend.token_to_id(name) if isinstance(name, str) else None
        if i is None and not hasattr(self.backend.model, "unk_token"):  # Unigram (SentencePiece) keeps an id only
            i = json.loads(self.backend.to_str()).get("model", {}).get("unk_id")
        return None if i in (None, self.bos_id, self.eos_id, self.pad_id) else int(i)

    def batch(self, texts: list[str]) -> torch.Tensor:
        """Token ids [B,P], padded on the right (to the whole context for SigLIP)."""
        if isinstance(texts, str):
            texts = [texts]
        rows = [self.encode(t) for t in texts]
        width = self.n_ctx if self.pad_to_context else max((len(r) for r in rows), default=1)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def decode(self, ids) -> str:
        """The text of token ids as transformers decodes it: the start, end and padding tokens left out (whether or
        not the backend registers them as special), CLIP's ``</w>`` word ends read as spaces."""
        special = {self.bos_id, self.eos_id, self.pad_id} - {None}
        text = self.backend.decode([int(i) for i in ids if int(i) not in special], skip_special_tokens=True)
        suffix = getattr(self.backend.model, "end_of_word_suffix", None)
        return text.replace(suffix, " ").strip() if suffix else text


def from_dir(directory: Path, n_ctx: int, bos_id, eos_id, pad_id, pad_to_context: bool = False) -> ClipTokenizer:
    """The tokenizer beside a checkpoint: ``tokenizer.json``, else CLIP's ``vocab.json`` + ``merges.txt``."""
    from tokenizers import Tokenizer as Backend

    directory = Path(directory)
    if (directory / "tokenizer.json").is_file():
        try:
            backend = Backend.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
            raise MechscopeError(f"{directory / 'tokenizer.json'}: unreadable tokenizer ({str(e)[:120]})") from None
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        backend = clip_bpe(directory / "vocab.json", directory / "merges.txt")
    else:
        raise MechscopeError(f"{directory}: no tokenizer (tokenizer.json, or vocab.json and merges.txt)")
    backend.no_truncation()
    backend.no_padding()
    return ClipTokenizer(backend, n_ctx, bos_id, eos_id, pad_id, pad_to_context)


def own_special_tokens(tok: ClipTokenizer, where) -> ClipTokenizer:
    """``tok`` with the start, end and padding ids its own vocabulary gives ``<|startoftext|>`` and
    ``<|endoftext|>`` (padding with the end token, as transformers' CLIPTokenizer does), for configs whose special
    ids are not this vocabulary's (old CLIP configs: bos 0, eos 2, pad 1)."""
    bos, eos = (tok.backend.token_to_id(s) for s in (BOS, EOS))
    if bos is None or eos is None:
        missing = BOS if bos is None else EOS
        raise MechscopeError(f"{where}: the config's text special tokens are the old placeholders (eos_token_id 2) "
                             f"and the tokenizer has no {missing} token to use instead")  # fmt: skip
    return ClipTokenizer(tok.backend, tok.n_ctx, bos, eos, eos, tok.pad_to_context)


def clip_bpe(vocab_file: Path, merges_file: Path):
    """CLIP's tokenizer from its vocabulary and merges, as transformers' ``CLIPConverter`` builds it."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import BPE

    from mechscope.core.validate import read_json_object

    vocab = read_json_object(Path(vocab_file), "tokenizer vocabulary (vocab.json: token -> id)")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vocab.values()):
        raise MechscopeError(f"{vocab_file}: expected token -> id (an integer ≥ 0) for every entry")
    try:
        lines = Path(merges_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MechscopeError(f"{merges_file}: unreadable BPE merges ({type(e).__name__})") from None
    merges = [tuple(line.split(" ")) for line in lines if line.strip() and not line.startswith("#version")]
    if any(len(m) != 2 for m in merges):
        raise MechscopeError(f"{merges_file}: expected one merge 'a b' per line")
    for special in (BOS, EOS):
        if special not in vocab:
            raise MechscopeError(f"{vocab_file}: no {special} token (a CLIP vocabulary has both special tokens)")
    try:
        backend = Backend(BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="</w>",
                              fuse_unk=False, unk_token=EOS))  # fmt: skip
    except Exception as e:
        raise MechscopeError(f"{vocab_file}: invalid BPE tokenizer ({str(e)[:120]})") from None
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing((EOS, vocab[EOS]), (BOS, vocab[BOS]), False, False)
    return backend


# ---- the small model's own tokenizer ------------------------------------------------------------

CHARS = " abcdefghijklmnopqrstuvwxyz0123456789"
CHAR_SPECIALS = ("<unk>", BOS, EOS)  # after the characters: the end token has the highest id, as in CLIP


def char_tokenizer(chars: str = CHARS):
    """A character-level ``tokenizers`` tokenizer (lowercased; unknown characters -> ``<unk>``, which
    :class:`ClipTokenizer` refuses) that adds the start
    and end tokens: the small image–text model's vocabulary. Returns the backend (``.save(path)`` writes it)."""
    from tokenizers import AddedToken, Regex, normalizers, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    vocab = {c: i for i, c in enumerate(chars)}
    for s in CHAR_SPECIALS:
        vocab[s] = len(vocab)
    backend = Backend(WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in CHAR_SPECIALS])
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return backend


def char_ids(chars: str = CHARS) -> dict[str, int]:
    """The special ids of :func:`char_tokenizer`: {"bos": ..., "eos": ..., "unk": ..., "vocab": size}."""
    n = len(chars)
    return {"unk": n, "bos": n + 1, "eos": n + 2, "vocab": n + 3}


def write_json_tokenizer(backend, path: Path) -> None:
    """The backend's ``tokenizer.json`` (pretty, as transformers writes it)."""
    Path(path).write_text(json.dumps(json.loads(backend.to_str()), indent=2, ensure_ascii=False) + "\n",
                          encoding="utf-8")  # fmt: skip
