"""Builds corpus.txt.gz, the text the default tokenizer is trained on.

Run once, by hand, with the project's Python (`python eep/model/data/make_corpus.py`); the
engine never runs it: the shipped corpus file is the input of `eep.tokenizer.train_tokenizer`.
The text is the docstrings of a fixed list of Python standard-library modules (PSF licence).
"""

from __future__ import annotations

import gzip
import importlib
import inspect
import logging
from collections.abc import Iterator
from pathlib import Path

MODULES = (
    "abc argparse array ast asyncio base64 bisect calendar cmd codecs collections "
    "concurrent.futures configparser contextlib copy csv dataclasses datetime decimal difflib "
    "email.message enum fractions ftplib functools getopt gettext glob gzip hashlib heapq hmac "
    "html.parser http.client http.cookies http.server imaplib inspect io ipaddress itertools "
    "json locale logging logging.handlers lzma mailbox math mimetypes multiprocessing "
    "numbers operator optparse os os.path pathlib pdb pickle pkgutil platform poplib pprint "
    "queue random re sched secrets selectors shelve shlex shutil signal smtplib socket "
    "socketserver sqlite3 ssl statistics string struct subprocess symtable sysconfig tarfile "
    "tempfile textwrap threading time timeit tkinter tokenize trace traceback turtle typing "
    "unittest unittest.mock urllib.parse urllib.request uuid warnings wave weakref "
    "xml.dom.minidom xml.etree.ElementTree xmlrpc.client zipfile zipimport zlib"
).split()


def _docs(obj: object, depth: int = 0) -> Iterator[str]:
    doc = inspect.getdoc(obj)
    if doc:
        yield doc
    if depth >= 2 or not (inspect.ismodule(obj) or inspect.isclass(obj)):
        return
    for name, member in sorted(vars(obj).items()):
        if name.startswith("_") or not (inspect.isclass(member) or callable(member)):
            continue
        if inspect.ismodule(obj) and getattr(member, "__module__", None) != obj.__name__:
            continue  # re-exports are documented where they are defined
        yield from _docs(member, depth + 1)


def build_corpus(out_path: Path) -> int:
    """Writes the gzip corpus (fixed mtime, so the bytes only depend on the docstrings)."""
    seen: set[str] = set()
    parts: list[str] = []
    for name in MODULES:
        for doc in _docs(importlib.import_module(name)):
            if doc not in seen and len(doc) >= 40:
                seen.add(doc)
                parts.append(doc)
    text = "\n\n".join(parts) + "\n"
    with open(out_path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
        gz.write(text.encode("utf-8"))
    return len(text.encode("utf-8"))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    size = build_corpus(Path(__file__).with_name("corpus.txt.gz"))
    logging.getLogger(__name__).info("corpus.txt.gz: %d bytes of text", size)
