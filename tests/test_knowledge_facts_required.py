"""data.require_facts: a knowledge index with a caption that is not a fact of the task is refused."""

import pytest

from rvqa.data import check_index_facts, knowledge_assignment
from rvqa.errors import KnowledgeTaskError


class _Index:
    """What check_index_facts reads of a KnowledgeIndex: len and lookup(rows)."""

    def __init__(self, texts):
        self.texts = list(texts)

    def __len__(self):
        return len(self.texts)

    def lookup(self, rows):
        rows = list(rows)
        return rows, [self.texts[r] for r in rows]


def _facts():
    a = knowledge_assignment(0)
    return a.facts()


def test_an_index_of_facts_passes():
    assert len(_facts()) == 24  # one fact card per emblem
    check_index_facts(_Index(_facts() * 200), "index 'knowledge-A'")  # 4,800 rows, 2 chunks


def test_a_caption_that_is_not_a_fact_is_named_with_its_row():
    texts = _facts() * 200
    texts[4500] = "a red circle"
    with pytest.raises(KnowledgeTaskError) as err:
        check_index_facts(_Index(texts), "index 'easyvqa-captions'")
    msg = str(err.value)
    assert "index 'easyvqa-captions'" in msg and "row 4500" in msg and "'a red circle'" in msg
    assert "data.require_facts" in msg
