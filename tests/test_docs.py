"""Every code block in README.md and docs/*.md runs, or says why not.

Each fence is labelled:
- ```python: run. The blocks of one page run in order in one namespace (a later block may use
  what an earlier one defined), as a user runs them: installed fastlora, no Triton interpreter,
  in an empty working folder (tests/doc_runner.py runs every page in one process, resetting
  Dynamo and the pattern registry between pages, so torch is imported once).
- ```bash: each command line runs in a shell in that folder, in its place among the page's
  Python blocks (a command may make a file the next Python block reads).
- ```text: output, pseudo-code or a synopsis; never run.

A comment on the line just above a fence changes that, visibly in the page's source:
- ``<!-- doc-test: skip: <reason> -->``: not run; the test is reported as skipped with the reason.
- ``<!-- doc-test: gpu -->``: run only on a machine with a CUDA device.
- ``<!-- doc-test: output -->`` above a ```text block: the output of the Python block before it;
  each of its lines must be printed by that block as shown, except lines with ``...`` (what the
  page leaves out, e.g. report rows whose source line numbers change with library versions).
"""
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^```(\S*)\s*$")
MARK = re.compile(r"^<!--\s*doc-test:\s*(skip|gpu|output)\s*:?\s*(.*?)\s*-->\s*$")


class Block:
    def __init__(self, page, line, lang, code, mark, reason):
        self.page, self.line, self.lang, self.code = page, line, lang, code
        self.mark, self.reason = mark, reason

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: pathlib.Path) -> list[Block]:
    found, lines, i = [], page.read_text().splitlines(), 0
    while i < len(lines):
        start = FENCE.match(lines[i])
        if not start:
            i += 1
            continue
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        mark = MARK.match(lines[i - 1]) if i else None
        found.append(Block(page, i + 1, start.group(1), "\n".join(lines[i + 1:end]) + "\n",
                           mark.group(1) if mark else None, mark.group(2) if mark else ""))
        i = end + 1
    return found


ALL = [b for page in PAGES for b in blocks(page)]


def _runnable(block: Block) -> bool:
    return block.mark != "skip" and (block.mark != "gpu" or torch.cuda.is_available())


def test_every_block_is_labelled():
    unlabelled = [b.name for b in ALL if b.lang not in ("python", "bash", "text")]
    assert not unlabelled, f"label these fences python, bash or text: {unlabelled}"
    misplaced = [b.name for b in ALL if b.mark == "output" and b.lang != "text"]
    assert not misplaced, misplaced
    unexplained = [b.name for b in ALL if b.mark == "skip" and not b.reason]
    assert not unexplained, f"say why these blocks are skipped: {unexplained}"


@pytest.mark.parametrize("block", [b for b in ALL if b.lang != "text" and not _runnable(b)],
                         ids=lambda b: b.name)
def test_blocks_not_run_here(block):
    pytest.skip(f"{block.name}: {block.reason if block.mark == 'skip' else 'needs a CUDA device'}")


PAGES_TO_RUN = [p for p in PAGES if any(b.lang in ("python", "bash") and _runnable(b)
                                        for b in blocks(p))]


@pytest.fixture(scope="module")
def page_runs(tmp_path_factory):
    """Every page's blocks, run once by tests/doc_runner.py (one process, torch imported once)."""
    folder = tmp_path_factory.mktemp("docs")
    plan = []
    for page in PAGES_TO_RUN:
        steps = []
        for i, b in enumerate(blocks(page)):
            if b.lang == "python" and _runnable(b):
                steps.append({"kind": "python", "index": i, "name": b.name, "code": b.code})
            elif b.lang == "bash" and _runnable(b):
                steps += [{"kind": "bash", "name": b.name, "code": command}
                          for command in _commands(b.code)]
        workdir = folder / page.stem
        workdir.mkdir()
        plan.append({"page": page.name, "dir": str(workdir), "steps": steps})
    (folder / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "doc_runner.py"),
                           str(folder / "plan.json"), str(folder / "results.json")],
                          env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((folder / "results.json").read_text())


@pytest.mark.parametrize("page", PAGES_TO_RUN, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_runs(page, page_runs):
    result = page_runs[page.name]
    assert result["error"] is None, f"{page.name}:\n{result['error']}"
    page_blocks = blocks(page)
    for i, block in enumerate(page_blocks):
        if block.mark == "output":
            _check_output(block, result["outputs"].get(str(_source_of(page_blocks, i)), ""))


def _source_of(page_blocks, i) -> int:
    source = next((j for j in range(i - 1, -1, -1) if page_blocks[j].lang == "python"), None)
    assert source is not None, f"{page_blocks[i].name}: an output block needs a python block"
    return source


def _check_output(block: Block, printed: str) -> None:
    shown = [line for line in block.code.splitlines() if line.strip() and "..." not in line]
    assert shown, f"{block.name}: an output block with nothing to check"
    got = {line.rstrip() for line in printed.splitlines()}
    stale = [line for line in shown if line.rstrip() not in got]
    assert not stale, f"{block.name} shows lines this run did not print: {stale}\n" \
                      f"it printed:\n{textwrap.indent(printed[-3000:], '    ')}"


def _commands(code: str) -> list[str]:
    """The command lines of a bash block (continuations joined, comments dropped)."""
    joined = code.replace("\\\n", " ")
    return [line.split(" #")[0].strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
