"""The demo's pool, built with no network: real prose that ships with Python plus junk.

Good documents: docstrings of the standard library, read from its source files with `ast`
(nothing is imported, so no module runs side effects such as `antigravity` opening a browser),
grouped one document per class (class doc + its methods' docs) and one per module (module doc +
its functions' docs), plus the language reference topics of `pydoc_data.topics` (the text of
`help('FOR')` etc.). Junk documents, deliberately low quality and seeded: word salad (real words
in random order), repeated boilerplate (cookie banners, footers), and keyword spam.

Every document gets `score`, a deterministic heuristic quality score in [0, 1]:

    score = min(1, stopword_share / 0.25) * distinct_trigram_share

English prose has ~25%+ function words ("the", "of", "is", ...) and rarely repeats a word
trigram; word salad has few function words and boilerplate and spam repeat themselves, so the
product ranks good text above junk without knowing how each document was made.
The pool is written as parquet (`text`, `score`, `source`) and reused when complete.
"""

from __future__ import annotations

import ast
import json
import random
import re
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from armlab.progress import console
from armlab.workdir import atomic_path, atomic_write_json, read_json

STOPWORDS = frozenset({
    "a", "an", "the", "of", "to", "in", "is", "are", "was", "were", "be", "been", "by", "for", "on", "at", "as",
    "with", "from", "that", "this", "these", "those", "it", "its", "or", "and", "not", "no", "if", "then", "than",
    "so", "but", "which", "who", "what", "when", "where", "how", "all", "any", "each", "can", "may", "will",
    "would", "should", "must", "has", "have", "had", "do", "does", "into", "out", "up", "over", "more", "most",
    "other", "such", "only", "also",
})  # fmt: skip
WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "turtledemo", "__pycache__", "ensurepip"}
MIN_CHARS, MAX_CHARS = 200, 700  # ~70-250 tokens with the demo's 512-token vocabulary
POOL_VERSION = 3


def quality_score(text: str) -> float:
    words = [w.lower() for w in WORD.findall(text)]
    if len(words) < 3:
        return 0.0
    stop = sum(w in STOPWORDS for w in words) / len(words)
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    distinct = len(set(trigrams)) / len(trigrams)
    return round(min(1.0, stop / 0.25) * distinct, 6)


def _chunks(text: str) -> list[str]:
    """Split text at paragraph (else sentence) breaks into documents of at most MAX_CHARS, so a
    document fits the demo's short context instead of being cropped by the loader's packing."""
    pieces: list[str] = []
    for para in text.split("\n\n"):
        pieces.extend(re.split(r"(?<=[.!?])\s+", para) if len(para) > MAX_CHARS else [para])
    out, cur = [], ""
    for piece in pieces:
        if cur and len(cur) + len(piece) + 2 > MAX_CHARS:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{piece}" if cur else piece
    if cur:
        out.append(cur)
    return [c[:MAX_CHARS] for c in out]


def stdlib_documents() -> list[str]:
    """Docstring documents from the stdlib's source (sorted file order: deterministic per Python)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    docs: list[str] = []
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts))
    for path in files:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module_parts = [ast.get_docstring(tree) or ""]
        for node in tree.body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(node):
                module_parts.append(f"{node.name}: {ast.get_docstring(node)}")
            elif isinstance(node, ast.ClassDef):
                parts = [f"class {node.name}: {ast.get_docstring(node) or ''}"]
                parts += [
                    f"{m.name}: {ast.get_docstring(m)}"
                    for m in node.body
                    if isinstance(m, ast.FunctionDef | ast.AsyncFunctionDef) and ast.get_docstring(m)
                ]
                docs.extend(_chunks("\n\n".join(parts)))
        docs.extend(_chunks("\n\n".join(p for p in module_parts if p)))
    from pydoc_data.topics import topics  # the language reference behind help('KEYWORD')

    for name in sorted(topics):
        docs.extend(_chunks(topics[name]))
    return [d.strip() for d in docs if len(d.strip()) >= MIN_CHARS]


BOILERPLATE = [
    "We use cookies to improve your experience. By continuing to browse you agree to our cookie policy.",
    "Click here to subscribe to our newsletter and never miss an update!",
    "Copyright All rights reserved. Terms of use. Privacy policy. Contact us. Sitemap.",
    "Share this post on Facebook Twitter LinkedIn Pinterest Email Print.",
    "Sign up now for free and get exclusive offers delivered to your inbox.",
]
SPAM = [
    "best",
    "cheap",
    "free",
    "download",
    "python",
    "tutorial",
    "online",
    "deal",
    "discount",
    "buy",
    "now",
    "top",
    "review",
    "2024",
    "crack",
    "full",
    "version",
    "fast",
    "easy",
    "guide",
]


def junk_documents(
    n: int, vocabulary: list[str], lengths: list[int], rng: random.Random
) -> list[tuple[str, str]]:
    """(kind, text) junk: half word salad, a quarter boilerplate, a quarter keyword spam."""
    out = []
    for i in range(n):
        target = rng.choice(lengths)
        if i % 4 in (0, 1):
            kind, words = "word_salad", []
            while sum(len(w) + 1 for w in words) < target:
                words.append(rng.choice(vocabulary))
            text = " ".join(words)
        elif i % 4 == 2:
            kind, text = "boilerplate", ""
            while len(text) < target:
                text += rng.choice(BOILERPLATE) + ("\n" if rng.random() < 0.3 else " ")
        else:
            kind, words = "keyword_spam", []
            while sum(len(w) + 1 for w in words) < target:
                words.append(rng.choice(SPAM))
            text = " ".join(words)
        out.append((kind, text.strip()))
    return out


def build_pool(dest: Path, junk_share: float = 0.2, files: int = 4, seed: int = 0) -> Path:
    """Write the demo pool to `dest` (parquet files + manifest.json); reused when complete."""
    manifest = dest / "manifest.json"
    want = {"version": POOL_VERSION, "junk_share": junk_share, "files": files, "seed": seed}
    if manifest.is_file() and {k: read_json(manifest).get(k) for k in want} == want:
        return dest
    console.print("demo: building the pool from the standard library's docstrings + synthetic junk")
    rng = random.Random(seed)
    good = stdlib_documents()
    vocabulary = sorted({w for d in good[:2000] for w in WORD.findall(d) if w.lower() not in STOPWORDS})
    n_junk = int(len(good) * junk_share / (1 - junk_share))
    junk = junk_documents(n_junk, vocabulary, [len(d) for d in good], rng)
    rows = [("stdlib", d) for d in good] + junk
    rng.shuffle(rows)
    dest.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        part = rows[i::files]
        table = pa.table(
            {
                "text": [t for _, t in part],
                "score": [quality_score(t) for _, t in part],
                "source": [k for k, _ in part],
            }
        )
        with atomic_path(dest / f"part_{i:03d}.parquet") as tmp:
            pq.write_table(table, tmp, compression="zstd")
    kinds = {k: sum(1 for kk, _ in rows if kk == k) for k in sorted({k for k, _ in rows})}
    atomic_write_json(
        manifest, {**want, "docs": len(rows), "chars": sum(len(t) for _, t in rows), "kinds": kinds}
    )
    console.print(f"demo: pool of {len(rows):,} docs ({json.dumps(kinds)}) in {dest}")
    return dest
