"""Tokenizers built in memory (no files, no hub): a byte-level BPE CLIP tokenizer and a Unigram T5 tokenizer."""

from __future__ import annotations

import itertools
import math
import string

from transformers import CLIPTokenizer, T5TokenizerFast

#: Vocabulary size of the real CLIP tokenizer (SD1.5 / SDXL text encoders).
CLIP_VOCAB_SIZE = 49408
#: Vocabulary size of the tiny text encoders and their tokenizers.
TINY_VOCAB_SIZE = 1000
CLIP_MAX_LENGTH = 77

_BOS = "<|startoftext|>"
_EOS = "<|endoftext|>"
_EOW = "</w>"
_WORD_START = "\u2581"  # SentencePiece's "▁"




def _byte_symbols() -> list[str]:
    """The 256 printable characters byte-level BPE uses for raw bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols = {b: chr(b) for b in printable}
    unprintable = (b for b in range(256) if b not in symbols)
    symbols.update({b: chr(256 + i) for i, b in enumerate(unprintable)})
    return [symbols[b] for b in range(256)]


def _clip_vocab(vocab_size: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style vocab (bytes, bytes + ``</w>``, merged pairs, specials) and its merges.

    Merges join two byte symbols, letters and digits first, until the vocab
    reaches ``vocab_size``; the two special tokens take the last two ids.
    """
    symbols = _byte_symbols()
    tokens = symbols + [s + _EOW for s in symbols]
    n_merges = vocab_size - len(tokens) - 2
    common = string.ascii_lowercase + string.digits
    ordered = list(common) + [s for s in symbols if s not in common]
    pairs = ((a, b + end) for a in ordered for b in ordered for end in (_EOW, ""))
    merges = list(itertools.islice(pairs, max(n_merges, 0)))
    if n_merges < 0 or len(merges) < n_merges:
        raise ValueError(f"CLIP vocab_size must be in [{len(tokens) + 2}, {len(tokens) + 2 + 2 * 256**2}]")
    tokens += [a + b for a, b in merges] + [_BOS, _EOS]
    return {token: i for i, token in enumerate(tokens)}, merges


def clip_tokenizer(vocab_size: int = CLIP_VOCAB_SIZE) -> CLIPTokenizer:
    """A byte-level BPE ``CLIPTokenizer`` of ``vocab_size`` tokens, built in memory.

    As in real CLIP, ``<|startoftext|>`` and ``<|endoftext|>`` are the last two
    ids, padding uses ``<|endoftext|>`` and ``model_max_length`` is 77.
    """
    vocab, merges = _clip_vocab(vocab_size)
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=_EOS,
        bos_token=_BOS,
        eos_token=_EOS,
        pad_token=_EOS,
        model_max_length=CLIP_MAX_LENGTH,
    )


def t5_tokenizer(vocab_size: int = TINY_VOCAB_SIZE, model_max_length: int = 512) -> T5TokenizerFast:
    """A Unigram ``T5TokenizerFast`` of ``vocab_size`` tokens, built in memory.

    Ids 0, 1, 2 are ``<pad>``, ``</s>``, ``<unk>`` as in T5, followed by
    word-start and inner pieces for single characters and lowercase pairs.
    """
    specials = ["<pad>", "</s>", "<unk>", _WORD_START]
    chars = string.ascii_lowercase + string.digits + string.ascii_uppercase + string.punctuation
    pairs = [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    candidates = [_WORD_START + c for c in chars] + list(chars) + [_WORD_START + p for p in pairs] + pairs
    n_regular = vocab_size - len(specials)
    if not 0 <= n_regular <= len(candidates):
        raise ValueError(f"T5 vocab_size must be in [{len(specials)}, {len(specials) + len(candidates)}]")
    pieces = specials + candidates[:n_regular]
    vocab = [(piece, 0.0 if i < 3 else -math.log(i)) for i, piece in enumerate(pieces)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)
