"""The documentation (README.md, docs/, mkdocs.yml) against the code it describes: no drift.

- The site builds with `mkdocs build --strict` (warnings are errors: broken links and anchors, pages left out of the
  nav); every page of docs/ is in the nav; README.md is short and starts with the two commands.
- What the pages show is what the code does: every `prefix-serve` command parses with the CLI's own parser; the route
  tables are the app's routes, both ways; every `PREFIX_SERVE_*` name is a setting (or a variable the page says reads
  it), and configuration.md lists every setting with its default and flag; the metrics named are the ones exported;
  every repository path shown exists; the code layout is the package's; the Docker image's defaults are the
  Dockerfile's; the benchmark tables are their JSON results; the shipped tasks' templates are their task.json.
- The quick start runs (slow): its commands as shown, against a real server with the embedded model and the shipped
  prefixes, each answer compared with the JSON the page shows; the OpenAI snippets run against the same server.

Each check names the page and the offending item.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
README = REPO / "README.md"
PAGES = sorted(DOCS.rglob("*.md"))
ALL_TEXTS = [README, *PAGES]

# The README's first lines: what CI (.ci/run) and users run. They must stay exactly these.
README_HEAD = [
    "# prefix-serve",
    "",
    "```bash",
    "bash .ci/setup && .venv/bin/prefix-serve serve            # set up, then serve the embedded SmolLM2-135M on 127.0.0.1:8000",  # noqa: E501
    "bash .ci/setup && .venv/bin/python -m pytest              # set up, then run the whole test suite (what CI runs)",
    "```",
]
README_MAX_LINES = 250

FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)


def rel(path: Path) -> str:
    return str(path.relative_to(REPO))


def code_blocks(text: str, *langs: str) -> list[str]:
    return [body for lang, body in FENCE.findall(text) if not langs or lang in langs]


def prose(text: str) -> str:
    """The text without its fenced code blocks."""
    return FENCE.sub("", text)


def code_spans(text: str) -> list[str]:
    return [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose(text))]


def logical_lines(block: str) -> list[str]:
    """A shell block's lines with backslash continuations joined."""
    return re.sub(r"\\\n\s*", "", block).splitlines()


def split_row(line: str) -> list[str]:
    """A table row's cells; a pipe inside a code span (`<|im_end|>`) or escaped (\\|) is not a separator."""
    cells, cell, in_code, previous = [], "", False, ""
    for char in line.strip()[1:-1]:
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code and previous != "\\":
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
        previous = char
    return [*cells, cell.strip()]


def tables(text: str) -> list[tuple[list[str], list[list[str]], int]]:
    """(header, body rows, offset in the text without code blocks) of every Markdown table outside code blocks."""
    found = []
    body = prose(text)
    for match in re.finditer(r"(?:^\|.*\|[ \t]*(?:\n|$))+", body, re.M):
        cells = [split_row(line) for line in match.group(0).splitlines() if line.strip()]
        if len(cells) >= 2 and set("".join(cells[1])) <= set("-: "):
            found.append((cells[0], cells[2:], match.start()))
    return found


def nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return []


# ---------------------------------------------------------------------------------------------------------------------
# The site and the README


def test_site_builds_with_warnings_as_errors(tmp_path: Path) -> None:
    site = tmp_path / "site"
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(REPO / "mkdocs.yml"), "--site-dir",
         str(site)],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}{proc.stderr}"
    assert (site / "index.html").is_file()
    # Images are symlinks to the results (mkdocs.yml says why): the site must hold the files, not dangling links.
    for image in DOCS.rglob("*.png"):
        built = site / image.relative_to(DOCS)
        assert built.is_file() and built.stat().st_size > 0, f"{rel(image)} did not reach the site (a broken symlink?)"


def test_readme_is_short_and_starts_with_the_two_commands() -> None:
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines, at most {README_MAX_LINES}: use docs/"
    assert lines[: len(README_HEAD)] == README_HEAD, (
        "README.md must start with exactly the two commands (CI and users run them):\n" + "\n".join(README_HEAD)
    )


def test_every_page_is_in_the_nav_and_every_nav_entry_is_a_page() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())
    assert config.get("strict") is True, "mkdocs.yml: strict: true (warnings are errors)"
    assert config.get("docs_dir", "docs") == "docs"
    listed = nav_pages(config["nav"])
    pages = [str(p.relative_to(DOCS)) for p in PAGES]
    unlisted, absent = [p for p in pages if p not in listed], [p for p in listed if p not in pages]
    assert not unlisted, f"pages not in mkdocs.yml's nav: {unlisted}"
    assert not absent, f"nav entries without a page: {absent}"
    assert len(listed) == len(set(listed)), f"pages listed twice in the nav: {listed}"


def test_readme_links_resolve() -> None:
    text = README.read_text()
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if re.match(r"[a-z]+://", target):
            continue
        path = target.split("#")[0]
        assert (REPO / path).exists(), f"README.md links to {target!r}, which does not exist"


# ---------------------------------------------------------------------------------------------------------------------
# Commands


def _parser() -> argparse.ArgumentParser:
    from service.cli import build_parser

    return build_parser()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _shown_commands() -> list[tuple[str, list[str]]]:
    """(page, argv after `prefix-serve`) of every prefix-serve command in a shell or console block."""
    found = []
    for path in ALL_TEXTS:
        for block in code_blocks(path.read_text(), "bash", "console", "sh", ""):
            for line in logical_lines(block):
                line = line.strip()
                if line.startswith("$ "):
                    line = line[2:]
                if "prefix-serve" not in line or line.startswith("#"):
                    continue
                try:
                    tokens = shlex.split(line, comments=True)
                except ValueError:
                    continue  # not a command (an output line)
                simple: list[list[str]] = [[]]  # the line's simple commands, split at shell operators
                for token in tokens:
                    if token in ("|", "&&", "||", ";"):
                        simple.append([])
                    else:
                        simple[-1].append(token)
                for words in simple:
                    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                        words = words[1:]  # VAR=value before the command
                    if words and words[0].rsplit("/", 1)[-1] == "prefix-serve":
                        argv = words[1:]
                        argv = argv[: argv.index(">")] if ">" in argv else argv
                        found.append((rel(path), argv))
    return found


def test_every_prefix_serve_command_shown_parses() -> None:
    parser = _parser()
    problems = []
    commands = _shown_commands()
    assert len(commands) > 20, f"found only {len(commands)} prefix-serve commands in the docs: is the scan broken?"
    for page, argv in commands:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                parser.parse_args(argv)
        except SystemExit:
            why = stderr.getvalue().strip().splitlines()[-1]
            problems.append(f"{page}: prefix-serve {shlex.join(argv)}\n    {why}")
    assert not problems, "commands shown in the docs that the CLI refuses:\n" + "\n".join(problems)


def test_every_prefix_serve_flag_mentioned_in_prose_exists() -> None:
    """Inline `prefix-serve SUB ... --flag` spans: the subcommand exists and takes every flag shown."""
    problems = []
    for path in ALL_TEXTS:
        for span in code_spans(path.read_text()):
            if not span.startswith("prefix-serve "):
                continue
            tokens = span.split()[1:]
            parser = _parser()
            while tokens and tokens[0] in _subcommands(parser):
                parser = _subcommands(parser)[tokens.pop(0)]
            if _subcommands(parser) and tokens and not tokens[0].startswith("-"):
                problems.append(f"{rel(path)}: `{span}`: {parser.prog} has no subcommand {tokens[0]!r}")
                continue
            options = {s for action in parser._actions for s in action.option_strings}
            for token in tokens:
                flag = token.split("=")[0]
                if flag.startswith("--") and flag not in options:
                    problems.append(f"{rel(path)}: `{span}`: {flag} is not an option of `{parser.prog}`")
    assert not problems, "\n".join(problems)


# Flags of other tools that the pages show in prose (pip, docker).
OTHER_TOOLS_FLAGS = {"--shm-size", "--require-hashes", "--no-deps", "--no-build-isolation", "--build-arg"}


def _all_options(parser: argparse.ArgumentParser) -> set[str]:
    options = {s for action in parser._actions for s in action.option_strings}
    for sub in _subcommands(parser).values():
        options |= _all_options(sub)
    return options


def test_every_bare_flag_mentioned_is_a_prefix_serve_option() -> None:
    """`--flag` spans in prose (the command is named around them): an option of some prefix-serve command."""
    options = _all_options(_parser())
    problems = []
    for path in ALL_TEXTS:
        for span in code_spans(path.read_text()):
            for flag in re.findall(r"(?:^|\s)(--[a-z][a-z0-9-]*)", span) if span.startswith("--") else []:
                if flag not in options and flag not in OTHER_TOOLS_FLAGS and not span.startswith("--init-*"):
                    problems.append(f"{rel(path)}: `{span}`: {flag}")
    assert not problems, "flags shown that no prefix-serve command takes:\n" + "\n".join(problems)


def test_python_modules_run_with_dash_m_exist() -> None:
    import importlib.util

    for path in ALL_TEXTS:
        for module in re.findall(r"python3? -m (service[\w.]*)", path.read_text()):
            assert importlib.util.find_spec(module) is not None, f"{rel(path)}: `python -m {module}`: no such module"


def test_python_snippets_compile() -> None:
    for path in ALL_TEXTS:
        for block in code_blocks(path.read_text(), "python"):
            try:
                ast.parse(block)
            except SyntaxError as exc:
                pytest.fail(f"{rel(path)}: a python block does not parse: {exc}\n{block}")


def test_json_blocks_parse() -> None:
    """```json blocks hold JSON Lines (one object per line, as the training data shows)."""
    for path in ALL_TEXTS:
        for block in code_blocks(path.read_text(), "json"):
            for line in block.splitlines():
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        pytest.fail(f"{rel(path)}: a json block's line is not JSON ({exc}): {line}")


# ---------------------------------------------------------------------------------------------------------------------
# Routes


@pytest.fixture(scope="module")
def openapi(loaded: Any, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from service.api.app import create_app

    app = create_app(Settings(prefix_dir=tmp_path_factory.mktemp("docs-store")), loaded)
    return app.openapi()


ROUTE = re.compile(r"^(GET|POST|DELETE|PUT|PATCH) (/\S*)$")


def _normal(path: str) -> str:
    return re.sub(r"\{[^}]*\}", "{}", path)


def _app_routes(openapi: dict[str, Any]) -> set[str]:
    return {f"{method.upper()} {_normal(path)}" for path, ops in openapi["paths"].items() for method in ops}


def test_route_tables_are_the_apps_routes(openapi: dict[str, Any]) -> None:
    app_routes = _app_routes(openapi)
    documented = set()
    page = DOCS / "api.md"
    for header, rows, _ in tables(page.read_text()):
        if header[0].lower() not in ("route", "endpoint"):
            continue
        for row in rows:
            spans = re.findall(r"`([^`]+)`", row[0])
            routes = [s for s in spans if ROUTE.match(s)]
            assert routes, f"{rel(page)}: a route table row names no `METHOD /path`: {row[0]}"
            documented |= {_normal(r) for r in routes}
    assert not documented - app_routes, f"{rel(page)} documents routes the app lacks: {sorted(documented - app_routes)}"
    assert not app_routes - documented, f"routes missing from {rel(page)}'s tables: {sorted(app_routes - documented)}"


def test_every_route_mentioned_exists(openapi: dict[str, Any]) -> None:
    app_routes = _app_routes(openapi)
    problems = []
    for path in ALL_TEXTS:
        for span in code_spans(path.read_text()):
            match = ROUTE.match(span)
            if match and _normal(span) not in app_routes:
                problems.append(f"{rel(path)}: `{span}`")
    assert not problems, "routes mentioned that the app does not have:\n" + "\n".join(problems)


def test_generate_parameters_and_upload_answer_are_the_schemas(openapi: dict[str, Any]) -> None:
    schemas = openapi["components"]["schemas"]
    api = (DOCS / "api.md").read_text()
    section = api[api.index("## Generate") :]
    section = section[: section.index("\n## ", 4)]
    accepted = section[section.index("- `parameters`:") : section.index("`details: true`")]
    neutral = section[section.index("TGI's other parameters (") :]
    neutral = neutral[: neutral.index(")")]
    shown = re.findall(r"`(\w+)`", accepted.replace("`parameters`", "")) + re.findall(r"`(\w+)`", neutral)
    fields = list(schemas["GenerateParameters"]["properties"])
    assert sorted(shown) == sorted(fields), f"api.md's parameters {sorted(shown)}, GenerateParameters {sorted(fields)}"

    tasks = (DOCS / "tasks.md").read_text()
    answer = re.search(r"201 with `([^`]+)`", tasks)
    assert answer, "tasks.md: the upload's answer fields (`201 with `...``) are missing"
    shown = [name.strip() for name in answer.group(1).replace("\n", " ").split(",")]
    fields = list(schemas["PrefixUploadResponse"]["properties"])
    assert shown == fields, f"tasks.md's upload answer {shown} vs PrefixUploadResponse {fields}"


# ---------------------------------------------------------------------------------------------------------------------
# Settings


CONFIGURATION = DOCS / "configuration.md"
SETTING_NAME = re.compile(r"PREFIX_SERVE_[A-Z0-9_]*[A-Z0-9]")
# Upper-case names the pages show that are neither settings nor PREFIX_SERVE_*: where each is defined.
OTHER_CONSTANTS = {
    "CAUSAL_LM": None,  # PEFT's TaskType
    "SEQ_2_SEQ_LM": None,  # PEFT's TaskType
    "LABEL_TASKS": "experiments/seq2seq_compare.py",
    "RELIABILITY_LOAD_S": "tests/test_load.py",
    "RELIABILITY_LOAD_CLIENTS": "tests/test_load.py",
    "RELIABILITY_CONCURRENCY_S": "tests/test_concurrency.py",
}


def _not_settings() -> dict[str, str]:
    """configuration.md's "Variables that are not settings": name -> the file that reads it."""
    text = CONFIGURATION.read_text()
    for header, rows, _ in tables(text):
        if header[:2] == ["variable", "read by"]:
            return {row[0].strip("`"): row[1].strip("`") for row in rows}
    pytest.fail(f"{rel(CONFIGURATION)} has no `| variable | read by |` table")


def _settings_rows() -> list[list[str]]:
    rows = []
    for header, body, _ in tables(CONFIGURATION.read_text()):
        if header[:3] == ["setting", "flag", "default"]:
            rows.extend(body)
    return rows


def test_every_prefix_serve_name_shown_is_a_setting_or_says_what_reads_it() -> None:
    fields = set(Settings.model_fields)
    others = _not_settings()
    problems = []
    for path in ALL_TEXTS:
        for name in sorted(set(SETTING_NAME.findall(path.read_text()))):
            if name[len("PREFIX_SERVE_") :].lower() not in fields and name not in others:
                problems.append(f"{rel(path)}: {name}")
    assert not problems, (
        "PREFIX_SERVE_* names that are no setting (service/settings.py) and not in configuration.md's table of other "
        "variables:\n" + "\n".join(problems)
    )
    for name, reader in others.items():
        assert name[len("PREFIX_SERVE_") :].lower() not in fields, f"{name} is a setting: list it with the settings"
        assert name in (REPO / reader).read_text(), f"{rel(CONFIGURATION)}: {name} is not in {reader}, which it names"


def test_upper_case_names_shown_are_settings_or_known_constants() -> None:
    fields = set(Settings.model_fields)
    problems = []
    for path in ALL_TEXTS:
        for span in code_spans(path.read_text()):
            if re.fullmatch(r"[A-Z][A-Z0-9]*(_[A-Z0-9]+)+", span) and not span.startswith("PREFIX_SERVE_"):
                if span.lower() not in fields and span not in OTHER_CONSTANTS:
                    problems.append(f"{rel(path)}: `{span}`")
    assert not problems, "upper-case names that are no setting (nor in OTHER_CONSTANTS):\n" + "\n".join(problems)
    for name, where in OTHER_CONSTANTS.items():
        assert where is None or name in (REPO / where).read_text(), f"{name} is not in {where}"


def _parse_default(cell: str) -> Any:
    """A default as configuration.md writes it: (none), `literal`, a number, or a number with KiB/MiB."""
    cell = cell.strip()
    if cell == "(none)":
        return None
    literal = re.fullmatch(r"`([^`]*)`", cell)
    if literal:
        return {"true": True, "false": False}.get(literal.group(1), literal.group(1))
    number = re.fullmatch(r"([\d.]+)(?: (KiB|MiB|GiB))?", cell)
    if number:
        value = float(number.group(1)) if "." in number.group(1) else int(number.group(1))
        return value * {None: 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}[number.group(2)]
    raise ValueError(f"unreadable default {cell!r}: write (none), `literal`, a number or N KiB/MiB")


def _default_as_shown(value: Any) -> Any:
    if value in (None, [], ""):
        return None
    if isinstance(value, Path):
        return str(value).replace(str(Path.home()), "~")
    return value


def test_configuration_lists_every_setting_with_its_default_and_flag() -> None:
    fields = Settings.model_fields
    serve = _subcommands(_parser())["serve"]
    flags = {s: a.dest for a in serve._actions for s in a.option_strings}
    rows = _settings_rows()
    assert rows, f"{rel(CONFIGURATION)} has no `| setting | flag | default | meaning |` tables"
    problems, seen = [], []
    for setting, flag, default, *_ in rows:
        name = setting.strip("`")
        field = name[len("PREFIX_SERVE_") :].lower()
        seen.append(field)
        if not name.startswith("PREFIX_SERVE_") or field not in fields:
            problems.append(f"{name}: no such setting")
            continue
        info = fields[field]
        actual = info.default_factory() if info.default_factory is not None else info.default  # type: ignore[call-arg]
        try:
            shown = _parse_default(default)
        except ValueError as exc:
            problems.append(f"{name}: {exc}")
            continue
        if shown != _default_as_shown(actual):
            problems.append(f"{name}: the page says the default is {default}, Settings says {actual!r}")
        if flag:
            flag = flag.strip("`")
            if flags.get(flag) != field:
                problems.append(f"{name}: `prefix-serve serve {flag}` does not set it (dest {flags.get(flag)!r})")
    missing = [f"PREFIX_SERVE_{f.upper()}" for f in fields if f not in seen]
    twice = sorted({f for f in seen if seen.count(f) > 1})
    assert not problems and not missing and not twice, (
        f"{rel(CONFIGURATION)} vs service/settings.py:\n" + "\n".join(problems)
        + (f"\nsettings missing from the page: {missing}" if missing else "")
        + (f"\nsettings listed twice: {twice}" if twice else "")
    )
    # And every serve flag that sets a setting is on the page.
    shown_flags = {row[1].strip("`") for row in rows if row[1]}
    undocumented = [f for f, dest in flags.items() if dest in fields and f.startswith("--") and f not in shown_flags]
    assert not undocumented, f"`prefix-serve serve` flags missing from {rel(CONFIGURATION)}: {undocumented}"


# ---------------------------------------------------------------------------------------------------------------------
# Metrics, paths, layout, Docker, benchmark figures, shipped tasks


def _expand_braces(name: str) -> list[str]:
    match = re.search(r"\{([^}]*)\}", name)
    if not match:
        return [name]
    head, tail = name[: match.start()], name[match.end() :]
    return [x for part in match.group(1).split(",") for x in _expand_braces(head + part + tail)]


def _metric_spans(text: str) -> set[str]:
    """Metric names in the text's code spans, `{a,b}` expanded, a trailing `{replica,task}` label list dropped."""
    return {n for span in code_spans(text) for n in _expand_braces(re.sub(r"\{(replica|task)[^}]*\}$", "", span))}


class _NoReplicas:
    """A Ray deployment view with no replica reporting: enough to list the deployment's metric families."""

    def live(self) -> list[dict[str, Any]]:
        return []

    def total(self, key: str) -> int:
        return 0


def _metric_names(metrics: Any) -> set[str]:
    names = set()
    for family in metrics.registry.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(f"{family.name}_total")
    return names


def test_metrics_shown_are_the_exported_ones() -> None:
    from service.metrics import Metrics
    from service.scaleout.ingress import install_deployment_metrics

    single = _metric_names(Metrics())
    deployment = Metrics()
    install_deployment_metrics(deployment, _NoReplicas())  # type: ignore[arg-type]
    exported = single | _metric_names(deployment)
    problems = []
    for path in ALL_TEXTS:
        for name in sorted(_metric_spans(path.read_text())):
            if re.fullmatch(r"prefix_serve_[a-z0-9_]+", name) and name not in exported:
                problems.append(f"{rel(path)}: `{name}`")
    assert not problems, "metrics shown that nothing exports:\n" + "\n".join(problems)
    for page, families in (("operations.md", single), ("scale-out-ray.md", exported - single)):
        shown = _metric_spans((DOCS / page).read_text())
        counters = {n[: -len("_total")] for n in families if n.endswith("_total")}
        undocumented = sorted(n for n in families - counters if n not in shown and f"{n}_total" not in shown)
        assert not undocumented, f"metrics missing from docs/{page}: {undocumented}"


REPO_PATH = re.compile(
    r"^(?:\.ci|service|tests|benchmarks|docker|deploy|docs|locks|prefixes)/[\w./-]*$|^[\w.-]+\.(?:toml|yml|yaml)$"
)


def _repo_paths(text: str) -> list[str]:
    candidates = [word.strip("(),;") for span in code_spans(text) for word in span.split()]
    for block in code_blocks(text, "bash", "console", "sh"):
        for line in logical_lines(block):
            with contextlib.suppress(ValueError):
                candidates.extend(shlex.split(line.lstrip("$ "), comments=True))
    paths = []
    for candidate in candidates:
        candidate = candidate.split("::")[0].split("[")[0].rstrip("…")
        if re.fullmatch(r"test_\w+\.py", candidate):
            candidate = "tests/" + candidate
        if REPO_PATH.match(candidate):
            paths.append(candidate)
    return paths


def test_every_repository_path_shown_exists() -> None:
    problems = []
    for path in ALL_TEXTS:
        for shown in _repo_paths(path.read_text()):
            if not (REPO / shown).exists() and not shown.startswith("docker/wheelhouse"):
                problems.append(f"{rel(path)}: {shown}")
    assert not problems, "repository paths shown that do not exist:\n" + "\n".join(sorted(set(problems)))


def test_every_test_named_exists() -> None:
    """`tests/test_x.py::test_name` (or a `test_x.py::test_name…` prefix, or a `test_name[...]` in a table)."""
    problems = []
    for path in ALL_TEXTS:
        for span in code_spans(path.read_text()):
            match = re.fullmatch(r"(?:tests/)?(test_\w+\.py)::(\w+)(…)?(?:\[.*\])?", span)
            if match:
                module, name, prefix = match.groups()
                source = (REPO / "tests" / module).read_text() if (REPO / "tests" / module).is_file() else ""
                pattern = rf"def {name}" + ("" if prefix else r"\(")
                if not re.search(pattern, source):
                    problems.append(f"{rel(path)}: `{span}`")
    reliability = (DOCS / "reliability.md").read_text()
    sources = "".join(p.read_text() for p in (REPO / "tests").glob("test_*.py"))
    for header, rows, _ in tables(reliability):
        for row in rows:
            for name in re.findall(r"`(test_\w+?)(?:…|\[[^`]*\])?`", row[0]):
                if not name.endswith(".py") and f"def {name}" not in sources:
                    problems.append(f"{rel(DOCS / 'reliability.md')}: `{name}`")
    assert not problems, "tests named in the docs that do not exist:\n" + "\n".join(problems)


def test_code_layout_is_the_package() -> None:
    page = DOCS / "how-it-works.md"
    block = next((b for b in code_blocks(page.read_text(), "") if b.startswith("service/")), None)
    assert block, f"{rel(page)}: the code layout block (starting with `service/`) is missing"
    listed, top = set(), ""
    for line in block.splitlines():
        entry = line.split()[0].rstrip("/")
        if line.startswith(" "):
            listed.add(f"{top}/{entry}")
        else:
            top = entry
            listed.add(entry)
    missing_on_disk = sorted(p for p in listed if not (REPO / p).exists())
    assert not missing_on_disk, f"{rel(page)}: the layout lists what does not exist: {missing_on_disk}"
    package = {
        f"service/{p.name}" for p in (REPO / "service").iterdir()
        if (p.suffix == ".py" and p.name != "__init__.py") or (p.is_dir() and (p / "__init__.py").is_file())
    }  # fmt: skip
    unlisted = sorted(package - listed)
    assert not unlisted, f"{rel(page)}: modules and packages of service/ missing from the layout: {unlisted}"


def test_docker_image_defaults_are_the_dockerfiles() -> None:
    page = DOCS / "deploy-docker.md"
    env = dict(re.findall(r"(PREFIX_SERVE_\w+)=(\S+)", (REPO / "docker/Dockerfile").read_text()))
    shown = {}
    for header, rows, _ in tables(page.read_text()):
        if header[:2] == ["variable", "image default"]:
            shown = {row[0].strip("`"): row[1].strip("`") for row in rows}
    assert shown, f"{rel(page)}: the `| variable | image default |` table is missing"
    assert shown == env, f"{rel(page)} shows the image's defaults {shown}; docker/Dockerfile sets {env}"


def _rounded(value: float, shown: str) -> str:
    places = len(shown.split(".")[1]) if "." in shown else 0
    return str(Decimal(str(value)).quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP))


BENCH_COLUMNS = {
    "tok/s": "tokens_per_s", "req/s": "requests_per_s", "requests": "requests",
    "p50 latency s": "latency_p50_s", "p95 latency s": "latency_p95_s",
    "p50 TTFT s": "ttft_p50_s", "p95 TTFT s": "ttft_p95_s", "p50 ITL s": "itl_p50_s", "p95 ITL s": "itl_p95_s",
    "median step s": "step_p50_s", "mean batch rows": "mean_batch_rows", "peak KV MB": "peak_kv_bytes",
}  # fmt: skip


def _bench_system(cell: str) -> str:
    name = re.sub(r"\*\*|\(the CPU default here\)|\(float32\)", "", cell).strip()
    name = re.sub(r"\s+float32$", "", name)
    return re.sub(r"\s+bfloat16$", "-bfloat16", name)


def test_benchmark_tables_are_their_json_results() -> None:
    checked = 0
    problems = []
    for page in (DOCS / "benchmarks.md", DOCS / "encoder-decoder.md"):
        text = prose(page.read_text())
        for header, rows, offset in tables(page.read_text()):
            if header[0] != "system":
                continue
            sources = re.findall(r"`(benchmarks/results/[\w./-]+\.json)`", text[:offset])
            assert sources, f"{rel(page)}: a benchmark table without its JSON result named before it"
            result = json.loads((REPO / sources[-1]).read_text())
            clients = (result.get("config") or {}).get("clients")
            for row in rows:
                cells = dict(zip(header, row))
                system = _bench_system(cells["system"])
                concurrency = int(cells.get("clients") or clients or 0)
                matches = [r for r in result["rows"] if r["system"] == system and r["concurrency"] == concurrency]
                if len(matches) != 1:
                    problems.append(f"{rel(page)}: no row {system!r} at {concurrency} clients in {sources[-1]}")
                    continue
                for column, shown in cells.items():
                    key = BENCH_COLUMNS.get(column)
                    shown = shown.strip("*")
                    if key is None or not shown:
                        continue
                    value = matches[0][key]
                    if key == "peak_kv_bytes":
                        value = value / 1e6
                    if _rounded(value, shown) != shown:
                        problems.append(f"{rel(page)}: {system} {column} shows {shown}, {sources[-1]} has {value}")
                    checked += 1
    assert not problems, "benchmark tables vs their results:\n" + "\n".join(problems)
    assert checked > 100, f"only {checked} benchmark figures checked: is the table scan broken?"


def test_shipped_tasks_table_is_their_task_json() -> None:
    page = DOCS / "quickstart.md"
    shown = {}
    for header, rows, _ in tables(page.read_text()):
        if header[0] == "task id":
            shown = {row[0].strip("`"): row[header.index("its stored `prompt_template`")].strip("`") for row in rows}
    stored = {
        p.parent.name: json.loads(p.read_text())["prompt_template"]
        for p in sorted((REPO / "prefixes").glob("*/task.json"))
    }
    assert shown == stored, f"{rel(page)}'s shipped tasks {shown} vs prefixes/*/task.json {stored}"


# ---------------------------------------------------------------------------------------------------------------------
# The quick start, run as shown (slow: the embedded model)


def _expected(comment: str) -> Any:
    """A JSON answer as a page shows it; `,...}` stands for keys not shown."""
    return json.loads(re.sub(r",\s*\.\.\.\s*}", ', "...": null}', comment))


def _matches(expected: Any, actual: Any, where: str = "") -> list[str]:
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return [f"{where or 'answer'}: {actual!r} is not an object"]
        problems = []
        keys = [k for k in expected if k != "..."]
        if "..." not in expected and set(actual) != set(keys):
            problems.append(f"{where or 'answer'}: keys {sorted(actual)} vs shown {sorted(keys)}")
        for key in keys:
            if key == "dtype":  # the page says which dtypes it may be; the test server runs float32
                if actual.get(key) not in ("bfloat16", "float32"):
                    problems.append(f"{where}.dtype: {actual.get(key)!r}")
                continue
            problems += _matches(expected[key], actual.get(key), f"{where}.{key}")
        return problems
    return [] if expected == actual else [f"{where}: {actual!r}, shown {expected!r}"]


class QuickStart:
    """Runs a page's shell lines as shown against a live server: localhost:8000 -> its port, `.venv/bin/prefix-serve`
    -> this checkout's CLI (uploads to that server). `# {...}` after a command is the answer it must give."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.url, self.workdir = url, workdir
        self.cli = shlex.join(
            [str(Path(sys.executable).with_name("prefix-serve"))]
            if Path(sys.executable).with_name("prefix-serve").exists() else [sys.executable, "-m", "service"]
        )  # fmt: skip
        self.outputs: dict[str, str] = {}

    def command(self, line: str) -> str:
        line = line.replace("localhost:8000", self.url.removeprefix("http://"))
        line = line.replace(".venv/bin/prefix-serve upload", f"{self.cli} upload --url {self.url}")
        return line

    def run(self, line: str, page: str) -> str:
        proc = subprocess.run(
            ["bash", "-c", self.command(line)], cwd=self.workdir, capture_output=True, text=True, timeout=120,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip
        assert proc.returncode == 0, f"{page}: `{line}` exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        with contextlib.suppress(ValueError):
            answer = json.loads(proc.stdout)
            assert not (isinstance(answer, dict) and "error" in answer), f"{page}: `{line}` answered {answer}"
        self.outputs[line] = proc.stdout
        return proc.stdout

    def bash_block(self, block: str, page: str) -> int:
        """Every command of the block in order; returns how many shown answers were compared."""
        compared, last, alternative_of = 0, None, None
        for line in logical_lines(block):
            stripped = line.strip()
            if not stripped:
                continue
            if stripped.startswith("# {"):
                assert last is not None, f"{page}: an answer before any command: {stripped}"
                problems = _matches(_expected(stripped[2:]), json.loads(last))
                assert not problems, f"{page}: the answer differs from the one shown:\n" + "\n".join(problems)
                compared += 1
                continue
            if stripped.startswith("#"):
                continue
            if alternative_of:  # `A  # or:` then B: B does what A did, so A's task is deleted first
                httpx.delete(f"{self.url}/prefixes/{alternative_of}", timeout=30).raise_for_status()
                alternative_of = None
            last = self.run(stripped, page)
            if stripped.endswith("# or:"):
                task = re.search(r"--task-id (\S+)", stripped)
                assert task, f"{page}: `{stripped}` offers an alternative but names no --task-id"
                alternative_of = task.group(1)
        return compared

    def console_block(self, block: str, page: str) -> int:
        """`$ command` lines followed by their output, shown verbatim."""
        compared = 0
        lines = logical_lines(block)
        for i, line in enumerate(lines):
            if not line.startswith("$ "):
                continue
            output = []
            for following in lines[i + 1 :]:
                if following.startswith("$ "):
                    break
                output.append(following)
            actual = self.run(line[2:], page)
            if output and output[0].startswith("{"):
                problems = _matches(_expected(output[0]), json.loads(actual))
                assert not problems, f"{page}: `{line}` answers differently than shown:\n" + "\n".join(problems)
                compared += 1
        return compared


@pytest.fixture(scope="module")
def live_embedded(
    embedded_model: Any, embedded_cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A real server with the embedded model and a copy of the shipped prefixes (the quick start's server)."""
    from service.api.app import create_app
    from tests.helpers import ThreadedServer

    store = tmp_path_factory.mktemp("quickstart") / "prefixes"
    shutil.copytree(REPO / "prefixes", store)
    app = create_app(Settings(prefix_dir=store, cache_dir=embedded_cache_dir), embedded_model)
    with ThreadedServer(app) as server:
        yield server.url


def _workdir(tmp_path: Path) -> Path:
    """The quick start's `path/to/adapter`: a shipped prefix's files (any PEFT adapter of the model would do)."""
    adapter = tmp_path / "path" / "to" / "adapter"
    shutil.copytree(REPO / "prefixes" / "sentiment", adapter)
    (adapter / "metadata.json").unlink(missing_ok=True)
    return tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("page", ["README.md", "docs/quickstart.md"])
def test_quick_start_runs_as_shown(page: str, live_embedded: str, tmp_path: Path) -> None:
    blocks = [b for b in code_blocks((REPO / page).read_text(), "bash") if "localhost:8000" in b]
    assert len(blocks) == 1, f"{page}: expected one quick start block, found {len(blocks)}"
    runner = QuickStart(live_embedded, _workdir(tmp_path))
    try:
        compared = runner.bash_block(blocks[0], page)
        assert compared >= 4, f"{page}: only {compared} answers compared"
        assert (tmp_path / "my-task.zip").stat().st_size > 0, f"{page}: the adapter download wrote nothing"
        # The upload's answer has the keys training.md's walkthrough shows.
        upload = next(out for line, out in runner.outputs.items() if "upload path/to/adapter" in line)
        walkthrough = (DOCS / "training.md").read_text()
        shown = json.loads(re.search(r"^\{\n.*?^\}$", walkthrough, re.M | re.S).group(0))  # type: ignore[union-attr]
        assert set(json.loads(upload)) == set(shown), f"docs/training.md's upload answer {sorted(shown)} vs {upload}"
    finally:
        for task in ("en-fr", "my-task"):
            httpx.delete(f"{live_embedded}/prefixes/{task}", timeout=30)


@pytest.mark.slow
def test_training_pages_answers_are_the_servers(live_embedded: str, tmp_path: Path) -> None:
    """training.md's `curl` transcripts: the shipped tasks, and `my-complaints` (byte for byte the shipped
    `complaints`, as the page says)."""
    page = "docs/training.md"
    complaints = REPO / "prefixes" / "complaints"
    template = json.loads((complaints / "task.json").read_text())["prompt_template"]
    files = {
        "adapter_config": ("adapter_config.json", (complaints / "adapter_config.json").read_bytes()),
        "adapter_model": ("adapter_model.safetensors", (complaints / "adapter_model.safetensors").read_bytes()),
    }
    response = httpx.post(
        f"{live_embedded}/prefixes", data={"task_id": "my-complaints", "prompt_template": template}, files=files,
        timeout=60,
    )
    assert response.status_code == 201, response.text
    try:
        runner = QuickStart(live_embedded, tmp_path)
        compared = sum(
            runner.console_block(b, page)
            for b in code_blocks((REPO / page).read_text(), "console")
            if "localhost:8000" in b
        )
        assert compared == 4, f"{page}: {compared} answers compared, expected 4"
    finally:
        httpx.delete(f"{live_embedded}/prefixes/my-complaints", timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("page", ["README.md", "docs/api.md"])
def test_openai_snippets_run_as_shown(page: str, live_embedded: str) -> None:
    """The pages' OpenAI-client snippets, in order in one namespace, against the live server; a `print(...)  # "x"`
    line must print x."""
    blocks = [b for b in code_blocks((REPO / page).read_text(), "python") if "openai" in b]
    assert blocks, f"{page}: no OpenAI snippet"
    namespace: dict[str, Any] = {}
    for block in blocks:
        code = block.replace("http://127.0.0.1:8000", live_embedded)
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, f"{page} (python block)", "exec"), namespace)  # noqa: S102 - the page's own code
        printed = out.getvalue().splitlines()
        for expected in re.findall(r"^print\(.*\)\s+# (\"[^\"]*\")\s*$", block, re.M):
            assert json.loads(expected) in printed, f"{page}: printed {printed}, the page shows {expected}"
