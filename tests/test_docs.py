"""Docs hygiene: the README stays inside the repository and lists every example, and the Python in README.md and
docs/*.md is code that could run: each ```python block parses, every `ep.X` / `ep_runtime.X` it (or an inline code
span) names exists, and every keyword argument given to an ep function, class or layer method is one it takes."""
import ast
import importlib
import inspect
import re
import shlex
from pathlib import Path

import pytest

import ep_runtime as ep
from ep_runtime.dispatchers.base import ExchangeDispatcher

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
DOTTED = re.compile(r"(?<![\w.])(ep|ep_runtime)((?:\.[A-Za-z_]\w*)+)")
# Names the snippets give objects of ours, so calls of their methods are checked too.
RECEIVERS = {"layer": ep.EPMoE, "dispatcher": ExchangeDispatcher, "d": ExchangeDispatcher}


def test_readme_lists_every_example():
    missing = [p.name for p in sorted((REPO / "examples").glob("*.py")) if f"examples/{p.name}" not in README]
    assert not missing, f"examples not listed in README.md: {missing}"


def test_readme_points_only_inside_the_repository():
    links = re.findall(r"\]\(([^)#]+)\)", README)  # markdown links
    paths = re.findall(r"`((?:\.\./|docs/|examples/|tests/|slurm/|scripts/)[\w./-]+\.\w+)", README)
    outside = [p for p in links + paths if p.startswith("../") or p.startswith("/")]
    assert not outside, f"README.md points outside the repository: {outside}"
    absent = [p for p in links + paths if not p.startswith("http") and not (REPO / p).exists()]
    assert not absent, f"README.md names files that do not exist: {absent}"


def _blocks(page: Path) -> list[tuple[int, str]]:
    """(line of the block's first code line, code) per ```python block."""
    text = page.read_text()
    return [(text[:m.start(1)].count("\n") + 1, m.group(1)) for m in BLOCK.finditer(text)]


def _inline_code(page: Path) -> list[tuple[int, str]]:
    """(line, code) per inline code span outside the fenced blocks that parses as a Python expression."""
    text = re.sub(r"^```.*?^```", lambda m: "\n" * m.group(0).count("\n"), page.read_text(), flags=re.S | re.M)
    spans = []
    for m in INLINE.finditer(text):
        try:
            ast.parse(m.group(1), mode="eval")
        except SyntaxError:
            continue
        spans.append((text[:m.start()].count("\n") + 1, m.group(1)))
    return spans


def _resolve(root: str, parts: list[str]):
    """The object `root.parts...` names (submodules imported as needed); raises AttributeError naming the part."""
    obj = ep
    for i, part in enumerate(parts):
        if hasattr(obj, part):
            obj = getattr(obj, part)
        elif inspect.ismodule(obj):
            try:
                obj = importlib.import_module(f"{obj.__name__}.{part}")
            except ImportError:
                raise AttributeError(f"{root}.{'.'.join(parts[:i + 1])}") from None
        elif inspect.isclass(obj) and part in getattr(obj, "__dataclass_fields__", {}):
            return None  # a field without a default: no class attribute, nothing further to check
        else:
            raise AttributeError(f"{root}.{'.'.join(parts[:i + 1])}")
    return obj


def _dotted(node: ast.AST) -> list[str]:
    """['ep', 'hf', 'replace_experts'] for ep.hf.replace_experts; [] for anything but a dotted name."""
    names = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    return [node.id, *reversed(names)] if isinstance(node, ast.Name) else []


def _callee(call: ast.Call):
    """The function or class of ours that `call` calls, or None when it is not ours (or not known)."""
    names = _dotted(call.func)
    if names[:1] in (["ep"], ["ep_runtime"]):
        target = _resolve(names[0], names[1:])
        if target in (ep.dispatchers.create, ep.runners.create) and call.args and isinstance(call.args[0], ast.Constant):
            registry = ep.dispatchers if target is ep.dispatchers.create else ep.runners
            return target, registry.get(call.args[0].value)  # its options go to the registered class
        return target, None
    if names and names[0] in RECEIVERS:
        cls = RECEIVERS[names[0]]
        if len(names) == 1:
            return cls.forward if cls is ep.EPMoE else None, None
        if len(names) == 2:
            if not hasattr(cls, names[1]):
                raise AttributeError(f"{cls.__name__} has no attribute {names[1]!r}")
            return getattr(cls, names[1]), None
    return None, None


def _parameters(fn) -> tuple[set, bool]:
    """(keyword names fn takes, whether it takes **kwargs too)."""
    params = inspect.signature(fn).parameters.values()
    keywords = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return keywords, any(p.kind == p.VAR_KEYWORD for p in params)


def _bad_keywords(tree: ast.AST) -> list[str]:
    bad = []
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        target, options_class = _callee(call)
        if target is None or not callable(target):
            continue
        keywords, open_ended = _parameters(target)
        if options_class is not None:  # create(name, ..., **options): the options are the class's
            keywords |= _parameters(options_class)[0]
            open_ended = False
        where = ".".join(_dotted(call.func)) or ast.unparse(call.func)
        bad += [f"{where}({k.arg}=...)" for k in call.keywords if k.arg and not open_ended and k.arg not in keywords]
        # EPMoE(dispatcher="name", dispatcher_options={...}): the options are that dispatcher's arguments
        given = {k.arg: k.value for k in call.keywords if k.arg}
        if target is ep.EPMoE and isinstance(given.get("dispatcher_options"), ast.Dict):
            name = given.get("dispatcher")
            if isinstance(name, ast.Constant):
                allowed = _parameters(ep.dispatchers.get(name.value))[0]
                bad += [f"dispatcher_options[{k.value!r}] of {name.value}" for k in given["dispatcher_options"].keys
                        if isinstance(k, ast.Constant) and k.value not in allowed]
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_python_blocks_parse_and_name_what_exists(page):
    problems = []
    for line, code in _blocks(page):
        try:
            tree = ast.parse(code)
        except SyntaxError as err:
            problems.append(f"{page.name}:{line + (err.lineno or 1) - 1}: {err.msg}")
            continue
        try:
            problems += [f"{page.name}:{line}: {b} is not a parameter" for b in _bad_keywords(tree)]
        except AttributeError as err:
            problems.append(f"{page.name}:{line}: {err} does not exist")
    for line, code in _inline_code(page):
        try:
            problems += [f"{page.name}:{line}: {b} is not a parameter" for b in _bad_keywords(ast.parse(code))]
        except AttributeError as err:
            problems.append(f"{page.name}:{line}: `{code}`: {err} does not exist")
    text = "\n".join(code for _, code in _blocks(page) + _inline_code(page))
    for root, path in {(m.group(1), m.group(2)) for m in DOTTED.finditer(text)}:
        try:
            _resolve(root, path.lstrip(".").split("."))
        except AttributeError as err:
            problems.append(f"{page.name}: {err} does not exist")
    assert not problems, "\n".join(sorted(problems))


def test_every_page_with_an_mpirun_command_says_how_to_run_it_as_root():
    """Open MPI refuses to start ranks as root (containers, CI) without --allow-run-as-root: a page that shows an
    mpirun command line says so."""
    silent = [page.name for page in PAGES
              if re.search(r"^mpirun ", page.read_text(), re.M) and "--allow-run-as-root" not in page.read_text()]
    assert not silent, f"pages with an mpirun command and no word on --allow-run-as-root: {silent}"


COMMAND = re.compile(r"(?:^|\s)(?:ep-runtime|-m ep_runtime)\s+(demo|env|bench)\b(.*)")


def _command_lines(page: Path) -> list[tuple[int, str, list[str]]]:
    """(line, command, arguments) of every `ep-runtime COMMAND ...` (or `-m ep_runtime COMMAND ...`) line of the
    page's ```bash blocks, continuation lines joined, comments dropped."""
    found = []
    text = page.read_text()
    for block in re.finditer(r"^```bash\n(.*?)^```", text, re.S | re.M):
        line = text[:block.start(1)].count("\n") + 1
        logical, start = "", line
        for raw in block.group(1).splitlines():
            logical += raw.split(" #")[0]
            line += 1
            if logical.endswith("\\"):
                logical = logical[:-1]
                continue
            match = COMMAND.search(logical)
            if match:
                found.append((start, match.group(1), shlex.split(match.group(2))))
            logical, start = "", line
    for span in INLINE.finditer(text):  # and inline code spans that are such a command line
        match = COMMAND.search(span.group(1))
        if match and match.group(1) in span.group(1).split():
            found.append((text[:span.start()].count("\n") + 1, match.group(1), shlex.split(match.group(2))))
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_command_lines_use_flags_that_exist(page, capsys):
    """Every `ep-runtime demo|env|bench` line of a page's shell blocks parses with the real parsers (no renamed or
    misspelt flag, no value outside a flag's choices). Shell variables and "$@" are left out."""
    from ep_runtime.bench.cli import build_parser as bench_parser
    from ep_runtime.cli import build_parser
    wrong = []
    for line, command, args in _command_lines(page):
        args = [a for a in args if "$" not in a]
        parser = bench_parser() if command == "bench" else build_parser()[1][command]
        try:
            parser.parse_args(args)
        except SystemExit:
            wrong.append(f"{page.name}:{line}: ep-runtime {command} {' '.join(args)}: "
                         f"{capsys.readouterr().err.strip().splitlines()[-1]}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("section,output", [("deepep_normal (throughput)", "deepep_normal.DeepEPNormalDispatchOutput"),
                                            ("deepep_ll (low latency)", "deepep_ll.DeepEPLLDispatchOutput"),
                                            ("mori", "mori.MoriDispatchOutput")])
def test_format_tables_list_every_field_of_the_dispatch_output(section, output):
    """docs/formats.md's table of each exchange format names exactly the fields its dispatch output has (mori's
    lacked num_runner_rows, the rows its runner is handed, and handle)."""
    import dataclasses

    module, _, name = output.partition(".")
    fields = {f.name for f in dataclasses.fields(getattr(importlib.import_module(f"ep_runtime.dispatchers.{module}"),
                                                         name))}
    page = (REPO / "docs" / "formats.md").read_text()
    body = page.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", body, re.M))
    assert listed == fields, (sorted(fields - listed), sorted(listed - fields))
