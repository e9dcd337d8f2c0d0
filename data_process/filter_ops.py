"""Quality filters and deduplicators over our parquet rows, with Data-Juicer's op names and defaults.

Filters are stateless: ``stat(sample)`` measures a row, ``keep(stat)`` decides. Deduplicators split in two:
``signature(sample)`` (computed in parallel workers) and ``DedupIndex.seen(signature)`` (sequential, in row
order, so the first occurrence is the one kept). The indexes hold one entry per kept row.
"""

from __future__ import annotations

import hashlib
import io
import math
import re
import sys
import unicodedata
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from PIL import Image

from .parquet_out import IMAGE_PLACEHOLDER

_SIZE_UNITS = {"": 1, "B": 1, "KB": 1 << 10, "KIB": 1 << 10, "MB": 1 << 20, "MIB": 1 << 20, "GB": 1 << 30,
               "GIB": 1 << 30, "TB": 1 << 40, "TIB": 1 << 40}
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([a-zA-Z]*)\s*$")
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_NON_WORD = re.compile(r"[^\w]+")


def parse_binary_size(value: Any) -> int:
    """``"10KB"`` -> 10240: units are powers of 1024, as in Data-Juicer's recipes (unlike the merger's
    ``parse_decimal_size``, where GB is 10**9 as on the HF hub)."""
    match = _SIZE.match(str(value))
    if not match or match.group(2).upper() not in _SIZE_UNITS:
        raise ValueError(f"bad size {value!r} (examples: 0, 512KB, 2MB, 1TB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])


@dataclass
class Sample:
    """One parquet row as the ops see it: scoped text and image bytes."""

    messages: list[dict]
    image_bytes: list[bytes]
    text_scope: str = "all"

    @cached_property
    def text(self) -> str:
        roles = {"all": ("user", "assistant"), "user": ("user",), "assistant": ("assistant",)}[self.text_scope]
        parts = [m["content"].replace(IMAGE_PLACEHOLDER, "") for m in self.messages if m["role"] in roles]
        return "\n".join(p.strip() for p in parts)

    @cached_property
    def image_sizes(self) -> list[tuple[int, int]]:
        return [Image.open(io.BytesIO(data)).size for data in self.image_bytes]


# ----------------------------------------------------------------------------------------------- filters

class RangeFilter:
    """Keeps rows whose stat lies in [low, high]."""

    low: float
    high: float

    def keep(self, stat: Any) -> bool:
        return self.low <= stat <= self.high


class TextLengthFilter(RangeFilter):
    name = "text_length_filter"

    def __init__(self, min_len: int = 10, max_len: int = sys.maxsize):
        self.low, self.high = min_len, max_len

    def stat(self, sample: Sample) -> int:
        return len(sample.text)


class WordsNumFilter(RangeFilter):
    """Words: whitespace-separated tokens with letters or digits; with ``lang: zh`` each CJK character counts."""

    name = "words_num_filter"

    def __init__(self, lang: str = "en", min_num: int = 10, max_num: int = sys.maxsize):
        if lang not in ("en", "zh"):
            raise ValueError("lang must be 'en' or 'zh'")
        self.lang, self.low, self.high = lang, min_num, max_num

    def stat(self, sample: Sample) -> int:
        text = sample.text
        if self.lang == "zh":
            cjk = len(_CJK.findall(text))
            text = _CJK.sub(" ", text)
            return cjk + sum(1 for token in text.split() if _NON_WORD.sub("", token))
        return sum(1 for token in text.split() if _NON_WORD.sub("", token))


class CharacterRepetitionFilter(RangeFilter):
    """Share of character n-gram occurrences taken by the most repeated n-grams (sqrt(#distinct) of them)."""

    name = "character_repetition_filter"

    def __init__(self, rep_len: int = 10, min_ratio: float = 0.0, max_ratio: float = 0.5):
        self.rep_len, self.low, self.high = rep_len, min_ratio, max_ratio

    def stat(self, sample: Sample) -> float:
        text, n = sample.text, self.rep_len
        counts = sorted(Counter(text[i:i + n] for i in range(len(text) - n + 1)).values(), reverse=True)
        if not counts:
            return 0.0
        repeated = sum(1 for c in counts if c > 1)
        top = min(int(math.sqrt(len(counts))), repeated)
        return sum(counts[:top]) / sum(counts)


class SpecialCharactersFilter(RangeFilter):
    """Share of characters that are not letters or marks (punctuation, symbols, digits, spaces, controls)."""

    name = "special_characters_filter"

    def __init__(self, min_ratio: float = 0.0, max_ratio: float = 0.25):
        self.low, self.high = min_ratio, max_ratio

    def stat(self, sample: Sample) -> float:
        text = sample.text
        if not text:
            return 0.0
        return sum(1 for ch in text if unicodedata.category(ch)[0] not in "LM") / len(text)


class ImageFilter(RangeFilter):
    """Per-image stats; ``any_or_all`` says whether one passing image keeps the row or all must pass."""

    def __init__(self, low, high, any_or_all: str = "any"):
        if any_or_all not in ("any", "all"):
            raise ValueError("any_or_all must be 'any' or 'all'")
        self.low, self.high, self.any_or_all = low, high, any_or_all

    def image_stats(self, sample: Sample) -> list:
        raise NotImplementedError

    def stat(self, sample: Sample) -> list:
        return self.image_stats(sample)

    def passes(self, value) -> bool:
        return RangeFilter.keep(self, value)

    def keep(self, stat: list) -> bool:
        if not stat:  # rows without images are not judged
            return True
        passed = [self.passes(value) for value in stat]
        return any(passed) if self.any_or_all == "any" else all(passed)


class ImageShapeFilter(ImageFilter):
    name = "image_shape_filter"

    def __init__(self, min_width: int = 1, max_width: int = sys.maxsize, min_height: int = 1,
                 max_height: int = sys.maxsize, any_or_all: str = "any"):
        super().__init__((min_width, min_height), (max_width, max_height), any_or_all)

    def image_stats(self, sample: Sample) -> list:
        return [list(size) for size in sample.image_sizes]

    def passes(self, size: list) -> bool:
        return all(lo <= v <= hi for v, lo, hi in zip(size, self.low, self.high))


class ImageAspectRatioFilter(ImageFilter):
    name = "image_aspect_ratio_filter"

    def __init__(self, min_ratio: float = 0.333, max_ratio: float = 3.0, any_or_all: str = "any"):
        super().__init__(min_ratio, max_ratio, any_or_all)

    def image_stats(self, sample: Sample) -> list:
        return [w / h if h else math.inf for w, h in sample.image_sizes]


class ImageSizeFilter(ImageFilter):
    """Encoded file size of each image, e.g. ``min_size: 1KB``, ``max_size: 10MB``."""

    name = "image_size_filter"

    def __init__(self, min_size: str = "0", max_size: str = "1TB", any_or_all: str = "any"):
        super().__init__(parse_binary_size(min_size), parse_binary_size(max_size), any_or_all)

    def image_stats(self, sample: Sample) -> list:
        return [len(data) for data in sample.image_bytes]


# ----------------------------------------------------------------------------------------------- dedup

class ExactIndex:
    def __init__(self):
        self.first: dict = {}

    def seen(self, signature, row_ref: str) -> str | None:
        """The first row with this signature, or None (then this row is recorded)."""
        first = self.first.get(signature)
        if first is None:
            self.first[signature] = row_ref
        return first


class DocumentDeduplicator:
    """Exact text duplicates (md5 of the scoped text)."""

    name = "document_deduplicator"

    def __init__(self, lowercase: bool = False, ignore_non_character: bool = False):
        self.lowercase, self.ignore_non_character = lowercase, ignore_non_character

    def signature(self, sample: Sample) -> bytes:
        text = sample.text.lower() if self.lowercase else sample.text
        if self.ignore_non_character:
            text = _NON_WORD.sub("", text)
        return hashlib.md5(text.encode("utf-8")).digest()

    def new_index(self) -> ExactIndex:
        return ExactIndex()


class MinHashIndex:
    def __init__(self, threshold: float, num_perm: int, params: tuple[int, int] | None):
        from datasketch import MinHashLSH

        self.num_perm = num_perm
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, params=params)

    def seen(self, minhash, row_ref: str) -> str | None:
        matches = self.lsh.query(minhash)
        if matches:
            return min(matches)
        self.lsh.insert(row_ref, minhash)
        return None


class DocumentMinhashDeduplicator:
    """Near-duplicate text with MinHash-LSH (datasketch): shingles of ``window_size`` words or characters."""

    name = "document_minhash_deduplicator"

    def __init__(self, tokenization: str = "space", window_size: int = 5, lowercase: bool = True,
                 num_permutations: int = 256, jaccard_threshold: float = 0.7, num_bands: int | None = None,
                 num_rows_per_band: int | None = None):
        if tokenization not in ("space", "character"):
            raise ValueError("tokenization must be 'space' or 'character'")
        if (num_bands is None) != (num_rows_per_band is None):
            raise ValueError("give both num_bands and num_rows_per_band, or neither")
        self.tokenization, self.window_size, self.lowercase = tokenization, window_size, lowercase
        self.num_permutations, self.jaccard_threshold = num_permutations, jaccard_threshold
        self.params = (num_bands, num_rows_per_band) if num_bands else None

    def shingles(self, text: str) -> set[str]:
        text = text.lower() if self.lowercase else text
        units = text.split() if self.tokenization == "space" else list(text)
        joiner = " " if self.tokenization == "space" else ""
        count = max(1, len(units) - self.window_size + 1)
        return {joiner.join(units[i:i + self.window_size]) for i in range(count)}

    def signature(self, sample: Sample):
        from datasketch import LeanMinHash, MinHash

        minhash = MinHash(num_perm=self.num_permutations, seed=1)
        minhash.update_batch([s.encode("utf-8") for s in self.shingles(sample.text)])
        return LeanMinHash(minhash)

    def new_index(self) -> MinHashIndex:
        return MinHashIndex(self.jaccard_threshold, self.num_permutations, self.params)


class NearImageIndex:
    """Rows whose image hashes are all within ``distance`` bits of an earlier row's (pigeonhole buckets)."""

    def __init__(self, distance: int, bits: int = 64):
        self.distance = distance
        self.chunks = distance + 1
        self.chunk_bits = math.ceil(bits / self.chunks)
        self.buckets: dict[tuple, list] = {}

    def _keys(self, hashes: tuple[int, ...], extra) -> list[tuple]:
        mask = (1 << self.chunk_bits) - 1
        return [(c, extra, tuple((h >> (c * self.chunk_bits)) & mask for h in hashes)) for c in range(self.chunks)]

    def seen(self, signature, row_ref: str) -> str | None:
        hashes, extra = signature
        keys = self._keys(hashes, extra)
        for key in keys:
            for other_hashes, other_ref in self.buckets.get(key, ()):
                if len(other_hashes) == len(hashes) and all(
                        bin(a ^ b).count("1") <= self.distance for a, b in zip(hashes, other_hashes)):
                    return other_ref
        for key in keys:
            self.buckets.setdefault(key, []).append((hashes, row_ref))
        return None


class ImageDeduplicator:
    """Duplicate images: ``method`` md5 (exact bytes) or a perceptual hash (phash, dhash, whash, ahash).

    ``hamming_distance`` > 0 also matches perceptual hashes that differ in that many bits; with
    ``consider_text`` the scoped text must be the same too.
    """

    name = "image_deduplicator"

    def __init__(self, method: str = "phash", consider_text: bool = False, hamming_distance: int = 0):
        if method not in ("md5", "phash", "dhash", "whash", "ahash"):
            raise ValueError("method must be one of md5, phash, dhash, whash, ahash")
        if method == "md5" and hamming_distance:
            raise ValueError("hamming_distance needs a perceptual method")
        self.method, self.consider_text, self.hamming_distance = method, consider_text, hamming_distance

    def _hash(self, data: bytes) -> int:
        if self.method == "md5":
            return int.from_bytes(hashlib.md5(data).digest(), "big")
        import imagehash

        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, hashes use 8-32 px anyway
        return int(str(getattr(imagehash, self.method)(image.convert("RGB"))), 16)

    def signature(self, sample: Sample):
        text = hashlib.md5(sample.text.encode("utf-8")).digest() if self.consider_text else None
        return tuple(self._hash(data) for data in sample.image_bytes), text

    def new_index(self):
        return NearImageIndex(self.hamming_distance) if self.hamming_distance else ExactIndex()


OPS = {op.name: op for op in (
    TextLengthFilter, WordsNumFilter, CharacterRepetitionFilter, SpecialCharactersFilter, ImageShapeFilter,
    ImageAspectRatioFilter, ImageSizeFilter, DocumentDeduplicator, DocumentMinhashDeduplicator, ImageDeduplicator,
)}


def is_dedup(op) -> bool:
    return hasattr(op, "signature")
