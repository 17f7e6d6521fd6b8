"""The documentation checks itself: the configuration reference equals what conf/default.yaml generates
and names every setting of JobConfig, every relative link resolves, pages stay short, and the
repository describes the project, not its development. Fast: no Spark."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import re
import subprocess
import tokenize
import typing
from pathlib import Path

import pytest

from dedup_spark import config

REPO = Path(__file__).resolve().parent.parent
README_MAX_BYTES = 12 * 1024
DOCS_PAGE_MAX_BYTES = 25 * 1024


def _generator():
    spec = importlib.util.spec_from_file_location("config_reference", REPO / "scripts" / "config_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tracked_files() -> list[str]:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True)
    return [name for name in listed.stdout.split("\0") if name and (REPO / name).is_file()]


def _markdown_pages() -> list[Path]:
    return [REPO / "README.md", REPO / "CHANGELOG.md", *sorted((REPO / "docs").rglob("*.md"))]


# --- (a), (b): the configuration reference ------------------------------------------------------------

def _reference_keys(page: str) -> set[str]:
    return set(re.findall(r"^### `([a-z_]+\.[a-z_0-9]+)`$", page, flags=re.M))


def _config_keys() -> set[str]:
    """Every setting of the config object, walked from its dataclasses: section.key."""
    sections = typing.get_type_hints(config.JobConfig)
    return {f"{section.name}.{field.name}" for section in dataclasses.fields(config.JobConfig)
            for field in dataclasses.fields(sections[section.name])}


def test_the_configuration_page_is_what_conf_default_yaml_generates():
    generator = _generator()
    generated = generator.render((REPO / "conf" / "default.yaml").read_text(encoding="utf-8"), generator.all_flags())
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == generated, "docs/configuration.md is out of date: run make docs"


def test_the_configuration_page_names_every_setting_of_jobconfig_and_no_other():
    page = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    documented, settings = _reference_keys(page), _config_keys()
    assert settings - documented == set(), "settings of JobConfig missing from docs/configuration.md"
    assert documented - settings == set(), "docs/configuration.md documents settings JobConfig does not have"


def test_the_reference_check_notices_a_missing_or_an_extra_setting():
    generator = _generator()
    text = (REPO / "conf" / "default.yaml").read_text(encoding="utf-8")
    page = generator.render(text, generator.all_flags())
    # A setting dropped from the YAML disappears from the page; one added appears: both are differences.
    dropped = generator.render(text.replace("  # Rows per read task.", "  # gone\n  # Rows per read task.")
                               .replace("  chunk_rows: 65536\n", ""), generator.all_flags())
    assert "input.chunk_rows" in _reference_keys(page) and "input.chunk_rows" not in _reference_keys(dropped)
    added = generator.render(text.replace("  max_rejected_fraction: 0.1\n",
                                          "  max_rejected_fraction: 0.1\n  # New.\n  brand_new: 1\n"), generator.all_flags())
    assert _reference_keys(added) - _config_keys() == {"input.brand_new"}


def test_flags_come_from_the_jobs_argument_parsers():
    flags = _generator().all_flags()
    assert flags["input.uri"] == ["`--input` (dedup.py)", "`--train` (audit.py)"]
    assert flags["search.threshold"] == ["`--threshold` (dedup.py, audit.py)"]
    assert flags["run.take_over"] == ["`--take-over` (dedup.py)"]
    assert "bucketing.m" not in flags


# --- (c): links ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"^(```|~~~).*?^\1", flags=re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _prose_of(markdown: str) -> str:
    return _CODE_SPAN.sub("", _FENCE.sub("", markdown))


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link's text only
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def anchors(markdown: str) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE.sub("", markdown), flags=re.M):
        slug = _slug(heading)
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f"{slug}-{count}")
    found |= set(re.findall(r"<a\s+(?:name|id)=\"([^\"]+)\"", markdown))
    return found


def broken_links(page: Path) -> list[str]:
    """The relative links of a Markdown page whose file, or whose #heading in it, does not exist."""
    text = page.read_text(encoding="utf-8")
    broken = []
    for target in _LINK.findall(_prose_of(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, flags=re.I):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved.read_text(encoding="utf-8")):
            broken.append(f"{target}: no such heading")
    return broken


@pytest.mark.parametrize("page", _markdown_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    assert page.exists(), page
    assert broken_links(page) == []


def test_the_link_check_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "a.md").write_text("# Title\n\n## The `b.c` setting\n\n## Twice\n\n## Twice\n\n```\n## Not one\n```\n")
    page = tmp_path / "index.md"
    page.write_text("[ok](a.md#the-bc-setting) [ok](a.md#twice-1) [ok](https://example.com/x.md) `[no](x.md)`\n"
                    "[gone](missing.md) [bad](a.md#nowhere) [fenced](a.md#not-one) [self](#here)\n\n## Here\n")
    assert broken_links(page) == ["missing.md: no such file", "a.md#nowhere: no such heading",
                                  "a.md#not-one: no such heading"]


# --- (d): sizes ---------------------------------------------------------------------------------------

def test_the_readme_is_short():
    size = (REPO / "README.md").stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes; keep it under {README_MAX_BYTES:,}"


@pytest.mark.parametrize("path", sorted(p for p in (REPO / "docs").rglob("*") if p.is_file()),
                         ids=lambda p: str(p.relative_to(REPO)))
def test_every_docs_file_is_short(path):
    size = path.stat().st_size
    assert size <= DOCS_PAGE_MAX_BYTES, f"{path.relative_to(REPO)} is {size:,} bytes: split it by topic"


# --- (e): the repository describes the project, not its development -----------------------------------

WORD = re.compile(r"\b[s]essions?\b", flags=re.I)
# Numbered, it is never Spark's or pytest's: "... 12", "...s 13-16", "... #3".
NUMBERED = re.compile(r"\b[s]essions?\s*#?\d+", flags=re.I)
# What a Spark or pytest one is called in this repository's prose and strings.
ALLOWED = [re.compile(pattern, flags=re.I) for pattern in (
    r"spark\s+[s]essions?\b",
    r"caller'?s\s+[s]ession\b",
    r"\b[s]ession's\s+(?:own\s+)?catalog\b",
    r"\b(?:active|local|same|its)\s+[s]ession\b",
    r"\btest\s+[s]ession\b",           # pytest's
    r"\b[s]ession\.[a-z_]\w*",         # the Spark module (.py), its run_concurrently, a SparkSession's stop()
    r"\bboto3\.[s]ession\b",
    r"\bscope\s*=\s*[\"'][s]ession[\"']",
)]
# The module that starts the SparkSession: the only file whose name may carry the word.
ALLOWED_FILE_NAMES = {"dedup_spark/session.py"}
_STRINGS = {tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", tokenize.STRING)}


def _disallowed(prose: str) -> list[str]:
    text = " ".join(prose.split())
    found = [match.group(0) for match in NUMBERED.finditer(text)]
    for pattern in ALLOWED:
        text = pattern.sub(" ", text)
    found += [text[max(0, m.start() - 40):m.end() + 40] for m in WORD.finditer(text)]
    return found


def _prose_pieces(name: str, text: str) -> list[str]:
    """What a reader reads in a file: a Python file's comments and strings (its identifiers are code,
    e.g. the Spark module session.py or a SparkSession variable); any other file whole."""
    if not name.endswith(".py"):
        return [re.sub(r"\n\s*#\s?", " ", text)]  # YAML / shell comments joined across lines
    pieces = []
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT:
                pieces.append(token.string)
            elif token.type in _STRINGS and token.string.strip("\"'") != "session":  # a pytest scope
                pieces.append(token.string)
    except (tokenize.TokenError, SyntaxError):
        pieces.append(text)
    return pieces


def development_narration(name: str, text: str) -> list[str]:
    """Where a file (its name, or what a reader reads in it) narrates development rather than naming
    a Spark or pytest one."""
    found = [f"file name {name}"] if re.search("[s]ession", name, flags=re.I) and name not in ALLOWED_FILE_NAMES else []
    for piece in _prose_pieces(name, text):
        found += _disallowed(piece)
    return found


def test_no_file_narrates_development_sessions():
    offenders = {}
    for name in _tracked_files():
        try:
            text = (REPO / name).read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        found = development_narration(name, text)
        if found:
            offenders[name] = found[:3]
    assert offenders == {}, "speak of the project, not of how it was developed"


def test_the_narration_check_tells_development_sessions_from_spark_ones():
    word = "sess" + "ion"  # spelled apart so this file passes its own check
    for narration in (f"the bench of {word} 12", f"{word}s 13-16 measured", f"in this {word} we tried",
                      f"per-{word} chronicle", f"# measured at 1M rows ({word} 16)"):
        assert development_narration("docs/x.md", narration), narration
    assert development_narration("bench/run.py", f'x = 1  # the {word} 20 run\n')
    assert development_narration(f"docs/bench-results/bench-100000-{word}21.md", "")
    for spark in ("a SparkSession", f"the caller's {word} is left as it was", f"a Spark {word} can read",
                  f"read through the {word}'s catalog", 'scope="session"', f"boto3.{word.title()}()",
                  f"{word}.run_concurrently", "aws_session_token"):
        assert development_narration("docs/x.md", spark) == [], spark
    assert development_narration("tests/conftest.py",
                                 f'@pytest.fixture(scope="{word}")\ndef spark():\n    yield {word}\n') == []
    assert development_narration("dedup_spark/session.py", "") == []
