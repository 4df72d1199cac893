"""Tokenizers, built on the ``tokenizers`` library.

* GPT-2 byte-level BPE from OpenAI's ``encoder.json`` + ``vocab.bpe`` (or a Hugging Face
  directory's ``vocab.json`` + ``merges.txt``, or its ``tokenizer.json``);
* the tokenizer embedded in a GGUF file (``tokenizer.ggml.*``), for byte-level BPE vocabularies;
* a text-trained toy's characters (:class:`CharTokenizer`).

``encode`` gives ids, ``decode`` text; for byte-level BPE, decode(encode(text)) == text.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from mechscope.core.errors import MechscopeError


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


# llama.cpp pre-tokenizer names -> how to split text before BPE
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _pre_tokenizer(kind: str | None):
    from tokenizers import Regex, pre_tokenizers

    if kind in (None, "default", "gpt-2", "gpt2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if kind == "smollm":
        # llama.cpp's SMOLLM rule and SmolLM2's own tokenizer.json: digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    if kind in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3"):
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise MechscopeError(f"unsupported GGUF pre-tokenizer {kind!r}; supported: gpt-2, smollm, llama-bpe")


class Tokenizer:
    def __init__(
        self, backend, bos_token_id: int | None = None, eos_token_id: int | None = None, add_bos: bool = False
    ) -> None:
        self.backend = backend
        self.bos_token_id, self.eos_token_id, self.add_bos = bos_token_id, eos_token_id, add_bos

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise MechscopeError(f"token id {bad[0]} outside the vocabulary 0..{self.vocab_size - 1}")
        return self.backend.decode(ids, skip_special_tokens=False)

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def _byte_level_bpe(
        cls, vocab: dict[str, int], merges: list[tuple[str, str]], specials: list[str], pre=None, user=(), **kw
    ) -> Tokenizer:
        """``specials``: control tokens, matched whole; ``user``: user-defined tokens, matched whole too (as
        llama.cpp and transformers match them) but ordinary text, not special."""
        from tokenizers import AddedToken, decoders, models, processors
        from tokenizers import Tokenizer as Backend

        try:
            backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        except Exception as e:  # the tokenizers library raises a bare Exception for a bad vocabulary
            raise MechscopeError(f"invalid BPE tokenizer: {e}") from None
        backend.pre_tokenizer = pre if pre is not None else _pre_tokenizer(None)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        if specials:
            backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
        if user:
            backend.add_tokens([AddedToken(s, special=False, normalized=False) for s in user])
        return cls(backend, **kw)

    @classmethod
    def from_gpt2_files(cls, vocab_file: str | Path, merges_file: str | Path) -> Tokenizer:
        """OpenAI's encoder.json + vocab.bpe, or Hugging Face's vocab.json + merges.txt."""
        from mechscope.core.validate import read_json_object

        vocab = read_json_object(Path(vocab_file), "tokenizer vocabulary (vocab.json: token -> id)")
        bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
        if bad is not None:
            raise MechscopeError(f"{vocab_file}: field {bad!r} is {vocab[bad]!r}; expected a token id (an integer ≥ 0)")
        try:
            lines = Path(merges_file).read_bytes().decode("utf-8").splitlines()
        except FileNotFoundError as e:
            raise MechscopeError(f"{e.filename}: tokenizer file not found") from None
        except UnicodeDecodeError as e:
            raise MechscopeError(f"{merges_file}: not UTF-8 text (byte {e.start}); expected BPE merges") from None
        except OSError as e:
            raise MechscopeError(f"{merges_file}: cannot read ({e.strerror or e})") from None
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        if any(len(m) != 2 for m in merges):
            raise MechscopeError(f"{merges_file}: expected one merge 'a b' per line")
        eot = vocab.get("<|endoftext|>")
        return cls._byte_level_bpe(
            vocab, merges, ["<|endoftext|>"] if eot is not None else [], bos_token_id=eot, eos_token_id=eot
        )

    @staticmethod
    def hf_dir_has_tokenizer(directory: Path) -> bool:
        return (directory / "tokenizer.json").is_file() or (directory / "vocab.json").is_file()

    @classmethod
    def from_hf_dir(cls, directory: str | Path) -> Tokenizer:
        """``tokenizer.json`` (every family), else GPT-2's ``vocab.json`` + ``merges.txt``.

        Special ids come from ``config.json`` (then ``tokenizer_config.json``'s token strings);
        whether encoding starts with BOS follows ``tokenizer_config.json``'s ``add_bos_token``,
        else the tokenizer's own post-processor (Llama, Mistral, Gemma prepend BOS; GPT-2,
        Pythia, Qwen do not), as transformers' tokenizers do.
        """
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        cfg, tcfg = _read_json(directory / "config.json"), _read_json(directory / "tokenizer_config.json")
        if (directory / "tokenizer.json").is_file():
            try:
                backend = Backend.from_file(str(directory / "tokenizer.json"))
            except Exception as e:  # the tokenizers library raises a bare Exception for a bad file
                raise MechscopeError(f"{directory / 'tokenizer.json'}: unreadable tokenizer ({e})") from None
            tok = cls(backend)
        else:
            tok = cls.from_gpt2_files(directory / "vocab.json", directory / "merges.txt")
        tok.bos_token_id = _special_id(tok, cfg.get("bos_token_id"), tcfg.get("bos_token"), tok.bos_token_id)
        tok.eos_token_id = _special_id(tok, cfg.get("eos_token_id"), tcfg.get("eos_token"), tok.eos_token_id)
        if "add_bos_token" in tcfg:
            tok.add_bos = bool(tcfg["add_bos_token"])
        elif tok.bos_token_id is not None:
            ids = tok.backend.encode("a", add_special_tokens=True).ids
            tok.add_bos = bool(ids) and ids[0] == tok.bos_token_id
        return tok

    @classmethod
    def from_gguf_meta(cls, meta: dict) -> Tokenizer:
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise MechscopeError(f"unsupported GGUF tokenizer {kind!r}; supported: gpt2 (byte-level BPE)")
        spelling = bytes_to_unicode()
        alphabet = set(spelling.values())
        tokens = meta.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
            raise MechscopeError("GGUF metadata key tokenizer.ggml.tokens: expected a non-empty list of strings")
        merge_list = meta.get("tokenizer.ggml.merges", [])
        if not isinstance(merge_list, list) or not all(isinstance(m, str) and " " in m for m in merge_list):
            raise MechscopeError("GGUF metadata key tokenizer.ggml.merges: expected a list of strings 'a b'")
        types = meta.get("tokenizer.ggml.token_type")
        if types is not None and not (isinstance(types, list) and all(isinstance(t, int) for t in types)):
            raise MechscopeError("GGUF metadata key tokenizer.ggml.token_type: expected a list of integers")
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            v = meta.get(key)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and 0 <= v < len(tokens)):
                raise MechscopeError(f"GGUF metadata key {key} is {v!r}; expected a token id 0..{len(tokens) - 1}")
        pre = meta.get("tokenizer.ggml.pre")
        if pre is not None and not isinstance(pre, str):
            raise MechscopeError(f"GGUF metadata key tokenizer.ggml.pre is {pre!r}; expected a string")
        vocab = {}
        for i, tok in enumerate(tokens):
            spelled = tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))
            vocab.setdefault(spelled, i)
        merges = [tuple(m.split(" ", 1)) for m in merge_list]
        types = types or [1] * len(tokens)
        # token types 3 (control) and 4 (user-defined) are matched whole; a token spelled outside the byte alphabet is
        # left out, as transformers leaves it (a mislabel of llama.cpp's)
        typed = [(t, ty) for t, ty in zip(tokens, types, strict=False) if set(t) <= alphabet]
        whole = {kind: [t for t, ty in typed if ty == kind] for kind in (3, 4)}
        return cls._byte_level_bpe(
            vocab,
            merges,
            whole[3],
            user=whole[4],
            pre=_pre_tokenizer(meta.get("tokenizer.ggml.pre")),
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
            add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        )


class CharTokenizer:
    """A text-trained toy's characters as a tokenizer: one id per character, in ``chars``' order.

    ``encode`` refuses, in one line, a text with characters the toy never saw (dropping them would silently join
    the words around them; callers put the text's name before the message); ``decode`` shows an id outside the
    vocabulary as ``#ID``.
    """

    def __init__(self, chars) -> None:
        self.chars = [str(c) for c in chars]
        self.lookup = {c: i for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        try:
            return [self.lookup[c] for c in text]
        except KeyError:
            unknown = sorted({c for c in text if c not in self.lookup})
            n = len(unknown)
            shown = ", ".join(repr(c) for c in unknown[:5]) + (f" and {n - 5} more" if n > 5 else "")
            raise MechscopeError(
                f"{n} character{'s' if n != 1 else ''} the model was not trained on ({shown}); its vocabulary is "
                f"the {len(self.chars)} characters of its training text"
            ) from None

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] if 0 <= int(i) < len(self.chars) else f"#{int(i)}" for i in ids)


def encode_named(encode, text: str, name: str, **kw) -> list[int]:
    """``encode(text, **kw)`` (a tokenizer's ``encode``), its one-line error led by the text's ``name`` ("the
    prompt", a file's path)."""
    try:
        return encode(text, **kw)
    except MechscopeError as e:
        raise MechscopeError(f"{name}: {e}") from None


def _read_json(path: Path) -> dict:
    from mechscope.core.validate import read_json_object

    if not path.exists():
        return {}
    return read_json_object(path, path.name)


def _special_id(tok: Tokenizer, from_config, token, fallback) -> int | None:
    """An id from config.json (a list: its first), else the id of tokenizer_config.json's token string."""
    if isinstance(from_config, list):
        from_config = from_config[0] if from_config else None
    if from_config is not None:
        return int(from_config)
    if isinstance(token, dict):  # {"content": "<s>", ...}
        token = token.get("content")
    found = tok.backend.token_to_id(token) if isinstance(token, str) else None
    return found if found is not None else fallback
