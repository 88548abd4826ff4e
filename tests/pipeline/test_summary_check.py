"""The summary-or-continuation screen (evaluation.summary_check.py) on outputs seen from SmolLM2."""

from __future__ import annotations

import subprocess
import sys

from evaluation.summary_check import SourceIndex, check_summary, repetitive, words

RUTH = """The King James Bible: Ruth

Ruth Chapter 1

1 Now it came to pass in the days when the judges ruled, that there was a famine in the land.
2 And the name of the man was Elimelech, and the name of his wife Naomi.
3 And Elimelech Naomi's husband died; and she was left, and her two sons.

Ruth Chapter 2

1 And Naomi had a kinsman of her husband's, a mighty man of wealth; and his name was Boaz.
2 And Ruth the Moabitess said unto Naomi, Let me now go to the field, and glean ears of corn.

Ruth Chapter 3

1 Then Naomi her mother in law said unto her, My daughter, shall I not seek rest for thee?
2 And now is not Boaz of our kindred, with whose maidens thou wast?
"""


def test_a_summary_in_its_own_words_is_a_summary():
    out = ("In Ruth 2, Naomi's kinsman Boaz is revealed as a witness to her family's redemption. The text "
           "highlights the role of Boaz in ensuring the survival of Naomi's family.")
    check = check_summary(out, RUTH)
    assert check.label == "summary" and check.copied < 0.3 and check.source_lines == 0


def test_more_of_the_document_is_a_continuation():
    # A new chapter heading and numbered verses, in the document's own layout (none of it copied).
    out = "Ruth Chapter 5\n\n1 And Naomi said unto her, I will not have you to go out of your house."
    check = check_summary(out, RUTH)
    assert check.label == "continuation" and check.source_lines >= 1 and check.copied < 0.3


def test_copied_sentences_are_a_continuation():
    out = "Now it came to pass in the days when the judges ruled, that there was a famine in the land."
    check = check_summary(out, RUTH)
    assert check.label == "continuation" and check.copied == 1.0


def test_loops_and_empty_outputs():
    loop = "The King James Bible: 1\n\nThe King James Bible: 2\n\nThe King James Bible: 3\n\nThe King James Bible"
    assert check_summary(loop, RUTH).label == "repetitive"
    assert check_summary("Ruth.", RUTH).label == "empty"
    assert check_summary(None, RUTH).label == "empty"
    assert repetitive(words("a b c d a b c d")) == 0.2  # 1 of 5 4-grams repeats
    assert words("Verse 12: And 7") == ["verse", "#", "and", "#"]


def test_one_index_serves_many_outputs():
    index = SourceIndex(RUTH)
    assert check_summary("Boaz marries Ruth, and Naomi finds rest at last in Bethlehem.", index).label == "summary"


def test_imports_nothing_heavy():
    code = "import sys, evaluation.summary_check; assert 'torch' not in sys.modules and 'pyarrow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
