"""Text corpora of the embedded default model, and loading of general corpora.

Two corpora come from the Python standard library sources of the running interpreter, each from a
fixed list of files (paths relative to ``sysconfig.get_paths()['stdlib']``), the two lists disjoint:

* the *training* corpus (``TRAIN_MODULES``): whole top-level modules, the code the miniature model
  learns Python from;
* the *general* corpus (``GENERAL_MODULES``): held-out package modules cut into short documents,
  shipped as ``assets/default/general_corpus.jsonl`` for the general-language filter (latents that
  fire on ordinary code, not on anything specific to a task, are excluded before ranking).

Files are read as UTF-8 and normalised (:func:`normalise_source`); each file's sha256 (of its bytes
on disk) and of its normalised text are recorded, with one hash over all of them. A different Python
version has different sources, so a corpus is built once and shipped or carried as a file rather than
rebuilt elsewhere: compare ``sha256`` values to know whether two builds match.

:func:`load_general_corpus` reads a general corpus from the packaged default or a local file;
:func:`write_jsonl` / :func:`read_jsonl` are the JSON-lines writer and reader of the build.
"""

from __future__ import annotations

import gzip
import json
import platform
import random
import re
import sysconfig
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pva_sae.data.text import unix_newlines
from pva_sae.errors import PvaSaeError
from pva_sae.hashing import sha256_bytes, sha256_text

PACKAGED_GENERAL = ("assets", "default", "general_corpus.jsonl")

# Top-level standard-library modules (Python 3.11 layout): the training corpus. Left out: generated
# or data-only files (_sysconfigdata*, _pydecimal, pydoc_data), one-line stubs (sre_*, decimal,
# struct, contextvars), jokes (this, antigravity, __hello__) and platform helpers for other systems.
TRAIN_MODULES: tuple[str, ...] = (
    "__future__.py", "_collections_abc.py", "_compat_pickle.py", "_compression.py", "_markupbase.py",
    "_py_abc.py", "_pyio.py", "_sitebuiltins.py", "_strptime.py", "_threading_local.py", "_weakrefset.py",
    "abc.py", "aifc.py", "argparse.py", "ast.py", "asynchat.py", "asyncore.py", "base64.py", "bdb.py",
    "bisect.py", "bz2.py", "cProfile.py", "calendar.py", "cgi.py", "cgitb.py", "chunk.py", "cmd.py",
    "code.py", "codecs.py", "codeop.py", "colorsys.py", "compileall.py", "configparser.py", "contextlib.py",
    "copy.py", "copyreg.py", "crypt.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "dis.py",
    "doctest.py", "enum.py", "filecmp.py", "fileinput.py", "fnmatch.py", "fractions.py", "ftplib.py",
    "functools.py", "genericpath.py", "getopt.py", "getpass.py", "gettext.py", "glob.py", "graphlib.py",
    "gzip.py", "hashlib.py", "heapq.py", "hmac.py", "imaplib.py", "imghdr.py", "imp.py", "inspect.py",
    "io.py", "ipaddress.py", "keyword.py", "linecache.py", "locale.py", "lzma.py", "mailbox.py",
    "mailcap.py", "mimetypes.py", "modulefinder.py", "netrc.py", "nntplib.py", "ntpath.py", "nturl2path.py",
    "numbers.py", "opcode.py", "operator.py", "optparse.py", "os.py", "pathlib.py", "pdb.py", "pickle.py",
    "pickletools.py", "pipes.py", "pkgutil.py", "platform.py", "plistlib.py", "poplib.py", "posixpath.py",
    "pprint.py", "profile.py", "pstats.py", "pty.py", "py_compile.py", "pyclbr.py", "pydoc.py", "queue.py",
    "quopri.py", "random.py", "reprlib.py", "rlcompleter.py", "runpy.py", "sched.py", "secrets.py",
    "selectors.py", "shelve.py", "shlex.py", "shutil.py", "signal.py", "site.py", "smtpd.py", "smtplib.py",
    "sndhdr.py", "socket.py", "socketserver.py", "ssl.py", "stat.py", "statistics.py", "string.py",
    "stringprep.py", "subprocess.py", "sunau.py", "symtable.py", "sysconfig.py", "tabnanny.py", "tarfile.py",
    "telnetlib.py", "tempfile.py", "textwrap.py", "threading.py", "timeit.py", "token.py", "tokenize.py",
    "trace.py", "traceback.py", "tracemalloc.py", "tty.py", "turtle.py", "types.py", "typing.py", "uu.py",
    "uuid.py", "warnings.py", "wave.py", "weakref.py", "webbrowser.py", "xdrlib.py", "zipapp.py",
    "zipfile.py", "zipimport.py",
)

# Modules inside standard-library packages, none of them in TRAIN_MODULES: the general corpus.
GENERAL_MODULES: tuple[str, ...] = (
    "asyncio/base_events.py", "asyncio/events.py", "asyncio/futures.py", "asyncio/locks.py",
    "asyncio/queues.py", "asyncio/runners.py", "asyncio/streams.py", "asyncio/subprocess.py",
    "asyncio/tasks.py", "asyncio/timeouts.py",
    "collections/__init__.py",
    "concurrent/futures/_base.py", "concurrent/futures/process.py", "concurrent/futures/thread.py",
    "ctypes/__init__.py", "ctypes/util.py",
    "curses/textpad.py",
    "dbm/__init__.py", "dbm/dumb.py",
    "email/_header_value_parser.py", "email/_parseaddr.py", "email/_policybase.py", "email/base64mime.py",
    "email/charset.py", "email/contentmanager.py", "email/feedparser.py", "email/generator.py",
    "email/header.py", "email/headerregistry.py", "email/iterators.py", "email/message.py",
    "email/parser.py", "email/policy.py", "email/quoprimime.py", "email/utils.py",
    "html/__init__.py", "html/parser.py",
    "http/client.py", "http/cookiejar.py", "http/cookies.py", "http/server.py",
    "importlib/_bootstrap.py", "importlib/_bootstrap_external.py", "importlib/metadata/__init__.py",
    "importlib/resources/_common.py", "importlib/util.py",
    "json/__init__.py", "json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py",
    "logging/__init__.py", "logging/config.py", "logging/handlers.py",
    "multiprocessing/connection.py", "multiprocessing/managers.py", "multiprocessing/pool.py",
    "multiprocessing/process.py", "multiprocessing/queues.py", "multiprocessing/synchronize.py",
    "re/__init__.py", "re/_compiler.py", "re/_parser.py",
    "sqlite3/dump.py",
    "tomllib/_parser.py", "tomllib/_re.py",
    "unittest/case.py", "unittest/loader.py", "unittest/main.py", "unittest/mock.py", "unittest/result.py",
    "unittest/runner.py", "unittest/suite.py",
    "urllib/error.py", "urllib/parse.py", "urllib/request.py", "urllib/robotparser.py",
    "wsgiref/handlers.py", "wsgiref/headers.py", "wsgiref/simple_server.py", "wsgiref/util.py",
    "wsgiref/validate.py",
    "xml/dom/minidom.py", "xml/dom/pulldom.py", "xml/etree/ElementPath.py", "xml/etree/ElementTree.py",
    "xml/sax/expatreader.py", "xml/sax/handler.py", "xml/sax/saxutils.py",
    "xmlrpc/client.py", "xmlrpc/server.py",
    "zoneinfo/_common.py", "zoneinfo/_tzpath.py", "zoneinfo/_zoneinfo.py",
)

_BLANK_RUN = re.compile(r"\n{4,}")  # four newlines = three blank lines


class CorpusError(PvaSaeError, ValueError):
    """A corpus file is missing or unreadable; the message names it."""


@dataclass
class SourceFile:
    """One standard-library file: its path (relative to the stdlib directory) and normalised text."""

    path: str
    text: str
    sha256_raw: str      # of the bytes on disk
    sha256_text: str     # of the normalised text (UTF-8)
    n_chars_raw: int
    truncated: bool


@dataclass
class Corpus:
    """A list of source files with their provenance."""

    name: str
    files: list[SourceFile] = field(default_factory=list)
    python_version: str = ""
    stdlib_dir: str = ""

    @property
    def sha256(self) -> str:
        """One hash over the (path, normalised-text hash) pairs in order."""
        return sha256_text("".join(f"{f.path}\0{f.sha256_text}\n" for f in self.files))

    @property
    def n_chars(self) -> int:
        return sum(len(f.text) for f in self.files)

    def manifest(self) -> dict[str, Any]:
        return {
            "name": self.name, "python_version": self.python_version, "stdlib_dir": self.stdlib_dir,
            "n_files": len(self.files), "n_chars": self.n_chars, "sha256": self.sha256,
            "files": [{"path": f.path, "sha256_raw": f.sha256_raw, "sha256_text": f.sha256_text,
                       "n_chars_raw": f.n_chars_raw, "n_chars": len(f.text), "truncated": f.truncated}
                      for f in self.files],
        }


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def normalise_source(text: str, max_chars: int | None = None) -> tuple[str, bool]:
    """Newlines to LF, trailing whitespace off every line, at most two blank lines in a row, one final
    newline; then, if longer than ``max_chars``, cut at the last line break before it. Returns the text
    and whether it was cut."""
    text = "\n".join(line.rstrip() for line in unix_newlines(text).split("\n"))
    text = _BLANK_RUN.sub("\n\n\n", text).strip("\n") + "\n"
    if max_chars is None or len(text) <= max_chars:
        return text, False
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1 if cut > 0 else max_chars], True


def read_stdlib(paths: Sequence[str], name: str, max_chars_per_file: int | None = None,
                root: str | Path | None = None) -> Corpus:
    """Read and normalise ``paths`` (relative to the stdlib directory, or ``root``) into a Corpus."""
    base = Path(root) if root is not None else stdlib_dir()
    corpus = Corpus(name=name, python_version=platform.python_version(), stdlib_dir=str(base))
    for rel in paths:
        path = base / rel
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise CorpusError(f"standard-library file {rel} is missing under {base} ({exc}); the module lists "
                              f"in pva_sae.default.corpus are for CPython 3.11") from None
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CorpusError(f"{path} is not UTF-8: {exc}") from None
        text, truncated = normalise_source(decoded, max_chars_per_file)
        corpus.files.append(SourceFile(path=rel, text=text, sha256_raw=sha256_bytes(raw),
                                       sha256_text=sha256_text(text),
                                       n_chars_raw=len(decoded), truncated=truncated))
    return corpus


def training_corpus(max_chars_per_file: int | None = 40_000, root: str | Path | None = None) -> Corpus:
    """The training corpus: ``TRAIN_MODULES``, each cut to ``max_chars_per_file`` (a few very long
    modules would otherwise dominate)."""
    _check_disjoint()
    return read_stdlib(TRAIN_MODULES, "train", max_chars_per_file, root)


def general_corpus(max_total_chars: int = 2_300_000, min_doc_chars: int = 400, max_doc_chars: int = 1_200,
                   seed: int = 0, root: str | Path | None = None) -> tuple[list[dict[str, str]], Corpus]:
    """Documents of the general corpus and the Corpus they come from.

    Each file of ``GENERAL_MODULES`` is cut into documents (:func:`split_documents`); the documents
    of all files are put in a seeded random order and taken until ``max_total_chars``, so every module
    contributes about in proportion to its size. Document ids are ``path#index``.
    """
    _check_disjoint()
    corpus = read_stdlib(GENERAL_MODULES, "general", None, root)
    docs = [{"id": f"{f.path}#{i}", "text": text}
            for f in corpus.files for i, text in enumerate(split_documents(f.text, min_doc_chars, max_doc_chars))]
    random.Random(seed).shuffle(docs)
    out, total = [], 0
    for doc in docs:
        if total + len(doc["text"]) > max_total_chars:
            continue
        out.append(doc)
        total += len(doc["text"])
    return out, corpus


def split_documents(text: str, min_chars: int = 400, max_chars: int = 1_200) -> list[str]:
    """Cut a source file into documents of about ``min_chars`` to ``max_chars`` characters.

    Blank-line-separated blocks are joined until a document reaches ``min_chars``; a block longer
    than ``max_chars`` is cut at line breaks. Documents never start or end inside a line.
    """
    pieces: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        block = block.strip("\n")
        if not block.strip():
            continue
        while len(block) > max_chars:
            cut = block.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(block[:cut])
            block = block[cut:].lstrip("\n")
        if block.strip():
            pieces.append(block)
    docs: list[str] = []
    current = ""
    for piece in pieces:
        joined = f"{current}\n\n{piece}" if current else piece
        if current and len(joined) > max_chars:
            docs.append(current)
            current = piece
        else:
            current = joined
        if len(current) >= min_chars:
            docs.append(current)
            current = ""
    if current and (len(current) >= min_chars // 4 or not docs):
        docs.append(current)
    return docs


def _check_disjoint() -> None:
    overlap = set(TRAIN_MODULES) & set(GENERAL_MODULES)
    if overlap:
        raise CorpusError(f"training and general module lists overlap: {sorted(overlap)}")


# --------------------------------------------------------------------------- files

def write_jsonl(docs: Iterable[dict[str, Any]], path: str | Path) -> str:
    """Write ``docs`` as JSON lines (UTF-8, LF, keys in the given order); returns the file's sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs).encode("utf-8")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return sha256_bytes(data)


def read_jsonl(path: str | Path) -> list[Any]:
    """The objects of a JSON-lines file (``.jsonl``, or gzipped ``.jsonl.gz``), blank lines skipped."""
    return [row for _, row in _jsonl_rows(Path(path))]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, object) of every non-blank line; CorpusError on a line that is not JSON."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise CorpusError(f"{path} line {n} is not valid JSON: {exc}") from None
            yield n, row


def packaged_general_path() -> Path:
    return Path(str(resources.files("pva_sae").joinpath(*PACKAGED_GENERAL)))


def load_general_corpus(source: str | Path = "packaged") -> list[str]:
    """Documents of a general corpus, in file order.

    ``source``: 'packaged' (the corpus shipped with the embedded default model) or a local file:

    * ``.jsonl`` / ``.jsonl.gz``: one JSON object per line, the document in its ``text`` field;
    * ``.parquet``: the ``text`` column;
    * ``.txt``: documents separated by one or more blank lines (paragraphs).
    """
    if str(source) == "packaged":
        path = packaged_general_path()
        if not path.is_file():
            raise CorpusError(f"the packaged general corpus {path} is missing; build the embedded default with "
                              f"`python scripts/train_default.py`, or pass a local corpus file")
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise CorpusError(f"general corpus file {path} does not exist")
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz")):
        return _read_jsonl_texts(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq  # only for Parquet corpora: the default build's train step has no pyarrow

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise CorpusError(f"{path} has no 'text' column (columns: {table.column_names})")
        return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
    if name.endswith(".txt"):
        text = path.read_text(encoding="utf-8").replace("\r\n", "\n")
        return [block.strip("\n") for block in re.split(r"\n(?:[ \t]*\n)+", text) if block.strip()]
    raise CorpusError(f"general corpus {path}: unsupported file type (use .jsonl, .jsonl.gz, .parquet or .txt)")


def _read_jsonl_texts(path: Path) -> list[str]:
    docs = []
    for n, row in _jsonl_rows(path):
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise CorpusError(f"{path} line {n} has no string 'text' field")
        docs.append(row["text"])
    return docs
