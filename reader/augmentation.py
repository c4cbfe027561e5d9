"""Counterfactual term worlds: training-time substitution of the facts a reader reads.

A reader trained on one fixed fact assignment can learn the answers from the
pixels (the red circle's owner is always "vardelo") and never read its evidence;
swapping in a new knowledge index then changes nothing. :class:`TermWorlds`
prevents that: each training question is rewritten, consistently in its
retrieved captions, its question and its answers, into one of several
*worlds* — tables that map every term of the training assignment (an entity
name, a good, a city) to the same emblem's term in another assignment. The
training assignment itself (no substitution) is one of the choices. Across the
training set the image no longer determines the answer; the evidence does.

The tables come from a JSON file (the knowledge task writes ``worlds.json``)::

    {"base": 0, "worlds": {"2": {"vardelo": "miskaro", "salt": "tin", ...}, ...}}

Substitution is one pass of whole-word matches (longest term first), so a table
that maps ``a → b`` and ``b → a`` swaps them. The world of a question in an epoch
is chosen by a hash of its id, the epoch and the seed (as the reader's k-dropout),
never by the RNG, so a data loader's read-ahead cannot disturb the RNG state that
checkpoints save, and a resumed run rewrites as the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rvqa.errors import DataFormatError

__all__ = ["TermWorlds"]


class TermWorlds:
    """Substitution tables ("worlds") over the terms of a training fact assignment.

    Args:
        worlds: Each world's table, term → replacement (lowercase words or
            phrases). World 0, the identity (the training assignment), is added
            in front: ``len(self) == len(worlds) + 1``.
        names: A name per given world (e.g. the assignment number), for logs.
        source: Where the tables come from, for error messages.

    Raises:
        DataFormatError: No world, a table that is not a mapping of non-empty
            strings, or tables over different term sets (the file is named).
    """

    def __init__(
        self,
        worlds: Sequence[Mapping[str, str]],
        names: Sequence[str] | None = None,
        source: str = "term worlds",
    ):
        if not worlds:
            raise DataFormatError(f"{source}: no world to substitute (expected at least one table)")
        terms: set[str] | None = None
        for i, table in enumerate(worlds):
            where = f"{source}: world {names[i] if names else i}"
            if not isinstance(table, Mapping) or not table:
                raise DataFormatError(f"{where}: expected a non-empty mapping term → term")
            for k, v in table.items():
                if not (isinstance(k, str) and k.strip() and isinstance(v, str) and v.strip()):
                    raise DataFormatError(
                        f"{where}: every term and replacement must be a non-empty string, "
                        f"got {k!r} → {v!r}"
                    )
            if terms is None:
                terms = set(table)
            elif set(table) != terms:
                diff = sorted(set(table) ^ terms)[:3]
                raise DataFormatError(
                    f"{where}: maps other terms than the first world (e.g. {', '.join(diff)}); "
                    "every world must map the same terms of the base assignment"
                )
        self.source = source
        self.names = ["base", *(list(names) if names else [str(i + 1) for i in range(len(worlds))])]
        self.tables: list[dict[str, str]] = [
            {},
            *({k.lower(): v.lower() for k, v in t.items()} for t in worlds),
        ]
        alternatives = sorted(terms or (), key=lambda t: (-len(t), t))
        self._pattern = re.compile(
            r"(?<![\w])(" + "|".join(re.escape(t.lower()) for t in alternatives) + r")(?![\w])",
            re.IGNORECASE,
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> TermWorlds:
        """Read a worlds JSON file (``{"base": ..., "worlds": {name: {term: term}}}``).

        Raises:
            FileNotFoundError: No such file.
            DataFormatError: Not JSON, or not of that shape (file and key named).
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"term worlds file {p} does not exist")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataFormatError(f"{p}: not a JSON file of term worlds ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("worlds"), dict):
            raise DataFormatError(
                f'{p}: expected {{"base": ..., "worlds": {{name: {{term: replacement}}}}}}, '
                "the key 'worlds' is missing or not a mapping"
            )
        names = list(data["worlds"])
        return cls([data["worlds"][n] for n in names], names=names, source=str(p))

    def __len__(self) -> int:
        return len(self.tables)

    def __repr__(self) -> str:
        return (
            f"TermWorlds({len(self) - 1} worlds + base, {len(self.tables[1])} terms, {self.source})"
        )

    def world_for(self, key: Any, seed: int = 0) -> int:
        """The world of a question (0 = base), from a hash of ``seed`` and ``key``."""
        h = hashlib.sha256(f"worlds:{seed}:{key}".encode()).hexdigest()[:12]
        return int(h, 16) % len(self.tables)

    def world_of(self, question_id: Any, epoch: int, seed: int = 0) -> int:
        """The world a training question is rewritten into in ``epoch`` (the one choice
        :class:`~rvqa.reader.data.ReaderDataset` and the scratch tokenizer's text share)."""
        return self.world_for(f"{question_id}@{epoch}", seed)

    def matches(self, text: str) -> bool:
        """Whether ``text`` holds a term of the base assignment."""
        return self._pattern.search(text) is not None

    def check_applies(self, answer_lists: Iterable[Sequence[str]], what: str) -> None:
        """Fail unless some answer holds a term of the tables: worlds written for another
        fact assignment would silently rewrite nothing.

        Raises:
            DataFormatError: Naming the tables' source and ``what`` was searched.
        """
        if not any(self.matches(a) for answers in answer_lists for a in answers):
            raise DataFormatError(
                f"{self.source}: none of its {len(self.tables[1])} terms occurs in {what}; "
                "these worlds were written for another fact assignment (make the task and "
                "its worlds together: rvqa make-knowledge-task)"
            )

    def rewrite(self, text: str, world: int) -> str:
        """``text`` with every term of the base assignment replaced by world ``world``'s."""
        table = self.tables[world]
        if not table:
            return text
        return self._pattern.sub(lambda m: table[m.group(1).lower()], text)

    def rewrite_all(self, texts: Iterable[str], world: int) -> list[str]:
        """:meth:`rewrite` of each text."""
        return [self.rewrite(t, world) for t in texts]

    def answer_lists(self, answer_lists: Iterable[Sequence[str]]) -> Iterable[list[str]]:
        """Every answer list in every world (for the answer vocabulary of a classifier).

        Each distinct list is rewritten once (VQA answer lists repeat a lot; the knowledge
        task has 72 distinct ones for thousands of questions, times hundreds of worlds)."""
        done: dict[tuple[str, ...], list[list[str]]] = {}
        for answers in answer_lists:
            key = tuple(answers) if not isinstance(answers, str) else None
            if key is None:  # not a list: build_vocab names the bad entry
                yield answers  # type: ignore[misc]
                continue
            if key not in done:
                done[key] = [self.rewrite_all(key, w) for w in range(len(self.tables))]
            # fresh lists: a consumer may keep or change what it is given
            yield from (list(a) for a in done[key])
