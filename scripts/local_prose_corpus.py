"""Write a second local text for issue 15's checks: the English prose (``*.md``, ``*.rst``,
``*.txt``) that ships inside the installed Python packages, de-duplicated, as one file.

  python scripts/local_prose_corpus.py OUT_FILE [--max_mb=8] [ROOT ...]

ROOTs default to this interpreter's site-packages (``sysconfig`` purelib and platlib), package
metadata folders (``*.dist-info``, ``*.egg-info``) left out. A file under 2 KiB or over 1 MiB,
one that is not UTF-8, or one whose bytes were already taken (licence texts repeat in many
packages) is skipped; the rest are cut at blank lines into chunks of about 2 KiB of whole
paragraphs, joined in the order of each chunk's hash (so that the positional train / valid /
test split of ``config.data.name=text`` draws every split from the same mix), up to
``--max_mb`` MiB. Different machines have different packages, so the text (like
``pystdlib``) differs between machines: compare ratios within one machine's runs, not BPC across
machines. Train with ``--config.data.name=text --config.data.path=OUT_FILE``.
"""

import argparse
import hashlib
import os
import sys
import sysconfig

SUFFIXES = (".md", ".rst", ".txt")
MAX_FILE = 1 << 20
MIN_FILE = 2048
CHUNK = 2048
METADATA = (".dist-info", ".egg-info")


def default_roots() -> list[str]:
    """This interpreter's site-packages folders (purelib, platlib), without repeats."""
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def prose_files(roots: list[str]) -> list[str]:
    """Every ``*.md`` / ``*.rst`` / ``*.txt`` under ``roots``, sorted by path."""
    found = []
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.endswith(METADATA))
            found.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(SUFFIXES))
    return sorted(set(found))


def readable(path: str) -> bytes | None:
    """The stripped bytes of a UTF-8 regular file of 2 KiB to 1 MiB, else None (a dangling
    link too)."""
    if not os.path.isfile(path) or not MIN_FILE <= os.path.getsize(path) <= MAX_FILE:
        return None
    with open(path, "rb") as fh:
        raw = fh.read().strip()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return raw


def chunks(raw: bytes, min_bytes: int = CHUNK) -> list[bytes]:
    """``raw`` cut at blank lines into runs of consecutive paragraphs of at least
    ``min_bytes`` (the last run may be shorter)."""
    out, current = [], []
    for paragraph in raw.split(b"\n\n"):
        if paragraph.strip():
            current.append(paragraph.strip(b"\n"))
        if current and sum(len(p) + 2 for p in current) >= min_bytes:
            out.append(b"\n\n".join(current))
            current = []
    if current:
        out.append(b"\n\n".join(current))
    return out


def corpus_bytes(files: list[str], max_bytes: int) -> bytes:
    """Each distinct readable file once, cut into chunks of about 2 KiB of whole paragraphs,
    the chunks of all files in the order of their SHA-256 (a fixed shuffle: the train / valid /
    test split of ``config.data.name=text`` is by position, so whole files in any fixed order
    would give each split a few packages of their own), up to ``max_bytes``."""
    by_digest = {}
    for path in files:
        raw = readable(path)
        if raw:
            by_digest.setdefault(hashlib.sha256(raw).digest(), raw)
    pieces = {hashlib.sha256(c).digest(): c for raw in by_digest.values() for c in chunks(raw)}
    return b"\n\n".join(pieces[d] for d in sorted(pieces))[:max_bytes]


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("roots", nargs="*")
    parser.add_argument("--max_mb", type=float, default=8.0)
    args = parser.parse_args(argv)
    files = prose_files(args.roots or default_roots())
    data = corpus_bytes(files, int(args.max_mb * (1 << 20)))
    if len(data) < 1 << 20:
        sys.exit(f"only {len(data)} bytes of prose found under {args.roots or default_roots()}")
    with open(args.out, "wb") as fh:
        fh.write(data)
    print(f"{args.out}: {len(data):,} bytes from {len(files)} candidate files")


if __name__ == "__main__":
    main(sys.argv[1:])
