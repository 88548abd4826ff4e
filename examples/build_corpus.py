"""Builds the example corpora shipped in the repo from the public-domain texts in examples/texts/.

    .venv/bin/python examples/build_corpus.py

- examples/quickstart/: 2 documents of 1.8k and 12.4k tokens (SmolLM2 tokenizer; the second
  is past SmolLM2's trained 8192), columns id, title, text - what scripts/quickstart.sh
  summarises, un-truncated, with DCA (two, so that the whole quickstart stays near 5 minutes on
  2 CPU cores).
- examples/corpus/: 6 documents of 3.5k-29k tokens in two Parquet files, columns id (string),
  title (string), text (string) - the summarisation example of docs/jobs.md's commands.
- examples/qa/: 3 documents with a `questions` column (list<string>) - the QA example.

The texts are copies of Project Gutenberg / King James Bible files (public domain): Jonah, Ruth,
Esther and Mark (KJV), chapters 1-3 and 1-4 of Alice's Adventures in Wonderland, Act 1 of As You
Like It, and the first part of the Library of Congress "Workshop on Electronic Texts" proceedings
(1992).
"""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq

HERE = os.path.dirname(os.path.abspath(__file__))
TEXTS = os.path.join(HERE, "texts")

DOCUMENTS = [  # (file, id, title); split over two files to show directory input
    [
        ("kjv-ruth.txt", "kjv-ruth", "The Book of Ruth (King James Version)"),
        ("kjv-esther.txt", "kjv-esther", "The Book of Esther (King James Version)"),
        ("kjv-mark.txt", "kjv-mark", "The Gospel of Mark (King James Version)"),
    ],
    [
        ("alice-chapters-1-3.txt", "alice-ch1-3", "Alice's Adventures in Wonderland, chapters 1-3"),
        ("as-you-like-it-act-1.txt", "as-you-like-it-act1", "As You Like It, Act 1"),
        ("loc-workshop-electronic-texts-part-1.txt", "loc-workshop-part1",
         "Workshop on Electronic Texts (Library of Congress, 1992), part 1"),
    ],
]

QUICKSTART = [
    ("kjv-jonah.txt", "kjv-jonah", "The Book of Jonah (King James Version)"),
    ("alice-chapters-1-4.txt", "alice-ch1-4", "Alice's Adventures in Wonderland, chapters 1-4"),
]

QUESTIONS = {
    "kjv-ruth": ["Who is Naomi?", "Whom does Ruth marry?", "Where do Naomi and Ruth go after the famine?"],
    "alice-ch1-3": ["What does Alice follow down the hole?", "What happens when Alice drinks from the bottle?"],
    "kjv-esther": ["Who is the king in this book?", "Who plots against the Jews, and what happens to him?"],
}


def _read(name: str) -> str:
    with open(os.path.join(TEXTS, name), encoding="utf-8") as f:
        return f.read()


def main() -> None:
    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("text", pa.string())])
    os.makedirs(os.path.join(HERE, "quickstart"), exist_ok=True)
    rows = [{"id": doc_id, "title": title, "text": _read(name)} for name, doc_id, title in QUICKSTART]
    path = os.path.join(HERE, "quickstart", "documents.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
    print(f"wrote {path}: {len(rows)} documents")
    os.makedirs(os.path.join(HERE, "corpus"), exist_ok=True)
    texts = {}
    for part, docs in enumerate(DOCUMENTS):
        rows = [{"id": doc_id, "title": title, "text": _read(name)} for name, doc_id, title in docs]
        texts.update({r["id"]: r["text"] for r in rows})
        path = os.path.join(HERE, "corpus", f"part-{part}.parquet")
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, compression="zstd")
        print(f"wrote {path}: {len(rows)} documents")
    qa_schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("questions", pa.list_(pa.string()))])
    rows = [{"id": doc_id, "text": texts[doc_id], "questions": qs} for doc_id, qs in QUESTIONS.items()]
    os.makedirs(os.path.join(HERE, "qa"), exist_ok=True)
    path = os.path.join(HERE, "qa", "questions.parquet")
    pq.write_table(pa.Table.from_pylist(rows, schema=qa_schema), path, compression="zstd")
    print(f"wrote {path}: {len(rows)} documents, {sum(len(q) for q in QUESTIONS.values())} questions")


if __name__ == "__main__":
    main()
