"""The unit every stage starts from: a question with its gold answer.

Its own module so that the sources of problems (``cft.benchmarks``, JSONL files and the testbed in
``cft.data``) and the code that picks among them share it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
