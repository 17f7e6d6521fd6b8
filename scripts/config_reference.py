"""Generate docs/configuration.md from conf/default.yaml: every setting once, with its default,
its command-line flag and its comment.

conf/default.yaml is the source (the comments are the documentation; ``dedup_spark.config.JobConfig``
mirrors its defaults, held equal by tests/test_config.py); this page is derived from it, so the two
cannot drift: tests/test_docs.py fails when the committed page differs from what this script writes.

    python scripts/config_reference.py           # rewrite docs/configuration.md
    python scripts/config_reference.py --check   # exit 1 when docs/configuration.md is out of date

Flags are read from the jobs' own argument parsers (``jobs/dedup.py``, ``jobs/audit.py``): each job
maps its flags to dotted settings in a ``flags = {"section.key": args.name, ...}`` literal.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf" / "default.yaml"
PAGE = REPO / "docs" / "configuration.md"
JOBS = ("dedup.py", "audit.py")

_SECTION = re.compile(r"^([a-z_]+):\s*$")
_KEY = re.compile(r"^  ([a-z_0-9]+):\s*(.*)$")
_COMMENT = re.compile(r"^\s*#( ?)(.*)$")


def parse_conf(text: str) -> tuple[list[str], list[dict]]:
    """The file's header comment lines, and its sections in order:
    ``{"name", "comment": [lines], "keys": [{"name", "default", "comment": [lines]}]}``."""
    header: list[str] = []
    sections: list[dict] = []
    pending: list[str] = []
    for line in text.splitlines():
        comment = _COMMENT.match(line)
        if comment:
            pending.append(comment.group(2))
            continue
        if not line.strip():
            if not sections and pending:
                header.extend(pending)
                pending = []
            continue
        section = _SECTION.match(line)
        if section:
            sections.append({"name": section.group(1), "comment": pending, "keys": []})
            pending = []
            continue
        key = _KEY.match(line)
        if key and sections:
            sections[-1]["keys"].append({"name": key.group(1), "default": key.group(2).strip(), "comment": pending})
            pending = []
            continue
        raise ValueError(f"{CONF.name}: unexpected line {line!r} (sections of one-line keys, comments above each)")
    return header, sections


def job_flags(path: Path) -> dict[str, str]:
    """Dotted setting -> its flag, from a job's ``add_argument`` calls and its ``flags = {...}`` literal."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    dest_to_flag: dict[str, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "add_argument"
                and node.args and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("--")):
            flag = str(node.args[0].value)
            dest_to_flag[flag[2:].replace("-", "_")] = flag
    settings: dict[str, str] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "flags" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            for key, value in zip(node.value.keys, node.value.values):
                names = [n.attr for n in ast.walk(value) if isinstance(n, ast.Attribute)
                         and isinstance(n.value, ast.Name) and n.value.id == "args"]
                if isinstance(key, ast.Constant) and names and names[0] in dest_to_flag:
                    settings[str(key.value)] = dest_to_flag[names[0]]
    return settings


def all_flags() -> dict[str, list[str]]:
    """Dotted setting -> ``--flag (job.py, ...)`` for every flag of the jobs that sets it."""
    jobs_of: dict[str, dict[str, list[str]]] = {}
    for job in JOBS:
        for setting, flag in job_flags(REPO / "jobs" / job).items():
            jobs_of.setdefault(setting, {}).setdefault(flag, []).append(job)
    return {setting: [f"`{flag}` ({', '.join(jobs)})" for flag, jobs in by_flag.items()]
            for setting, by_flag in jobs_of.items()}


def _escape(text: str) -> str:
    """Comment text as Markdown: no accidental emphasis (N*K) or HTML (<output>) outside `code`."""
    parts = text.split("`")
    for index in range(0, len(parts), 2):  # even parts lie outside backticks
        parts[index] = (parts[index].replace("\\", "\\\\").replace("*", "\\*")
                        .replace("<", "&lt;").replace(">", "&gt;"))
        parts[index] = re.sub(r"\bdocs/([\w-]+\.md)", r"[docs/\1](\1)", parts[index])  # links from docs/
    return "`".join(parts)


def _prose(lines: list[str]) -> str:
    """Comment lines as Markdown: paragraphs, and an indented ``name: text`` run as a list."""
    out: list[str] = []
    in_list = False
    for raw in lines:
        stripped = raw.strip()
        if raw.startswith("    ") and in_list:
            out[-1] += " " + _escape(stripped)
        elif raw.startswith("  ") and re.match(r"^[\w.]+:", stripped):
            if not in_list:
                out.append("")
            out.append("- " + _escape(stripped))
            in_list = True
        else:
            if in_list:
                out.append("")
            out.append(_escape(stripped))
            in_list = False
    return "\n".join(out).strip()


def _default(value: str) -> str:
    return f"`{value}`" if value else "`null`"


def render(text: str, flags: dict[str, list[str]]) -> str:
    header, sections = parse_conf(text)
    lines = [
        "# Configuration reference",
        "",
        "<!-- Generated from conf/default.yaml by scripts/config_reference.py (make docs). Do not edit by hand:",
        "     change the comments in conf/default.yaml and run make docs; tests/test_docs.py checks it. -->",
        "",
        "Every setting of the job, its default, the command-line flag that sets it (where there is one) and",
        "what it does. The source is [`conf/default.yaml`](../conf/default.yaml); this page is generated from it.",
        "",
        _prose(header[1:]),  # the header's first line is the file's title
        "",
        "A setting is written `section.key`: in a YAML file given with `--config` it is `key:` under `section:`; on",
        "the command line it is `--set section.key=value`; in Python it is `deduplicate(df, section={\"key\": value})`",
        "or a `JobConfig` from `dedup_spark.load_config(\"file.yaml\")`.",
        "",
        "Sections: " + ", ".join(f"[{s['name']}](#{s['name']})" for s in sections) + ".",
        "",
    ]
    for section in sections:
        lines += [f"## {section['name']}", ""]
        if section["comment"]:
            lines += [_prose(section["comment"]), ""]
        for key in section["keys"]:
            dotted = f"{section['name']}.{key['name']}"
            where = "; ".join(flags.get(dotted, [])) or "none (`--set`)"
            lines += [f"### `{dotted}`", "", f"Default: {_default(key['default'])}. Flag: {where}.", ""]
            if key["comment"]:
                lines += [_prose(key["comment"]), ""]
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the page is out of date, write nothing")
    args = parser.parse_args(argv)
    page = render(CONF.read_text(encoding="utf-8"), all_flags())
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != page:
            print(f"{PAGE.relative_to(REPO)} is out of date: run make docs", file=sys.stderr)
            return 1
        return 0
    PAGE.parent.mkdir(parents=True, exist_ok=True)
    PAGE.write_text(page, encoding="utf-8")
    print(PAGE.relative_to(REPO))
    return 0


if __name__ == "__main__":
    sys.exit(main())
