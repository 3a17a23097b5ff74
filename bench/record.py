"""Runs a benchmark command and records its output in docs/benchmarks.md, so no figure there is typed by hand.

    python bench/record.py NAME [--doc PATH] -- COMMAND [ARGS...]

The command's stdout is shown live and kept (its stderr is shown live, unrecorded). On exit code 0, or 1
(a missed target is still a figure worth recording; but not 1 with a Python traceback on stderr, which is
a crash), the text between ``<!-- bench:NAME start -->`` and
``<!-- bench:NAME end -->`` in the doc is replaced by: the date (UTC), the machine (CPU model, cores,
threads), the git commit, the exact command and its output verbatim in a fenced block. Where the markers
are absent a new section is appended at the end. Nothing outside the markers is touched. On any other exit
code nothing is recorded and record.py exits with that code.
"""

from __future__ import annotations

import argparse
import datetime
import fcntl
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
RECORDED_CODES = (0, 1)


def markers(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} start -->", f"<!-- bench:{name} end -->"


def check_doc(doc: Path, name: str) -> None:
    """Refuses, before the command runs, a doc it could not update: missing, or with broken markers."""
    if not doc.is_file():
        raise SystemExit(f"record.py: {doc} does not exist; pass --doc with an existing Markdown file.")
    start, end = markers(name)
    text = doc.read_text(encoding="utf-8")
    counts = (text.count(start), text.count(end))
    if counts == (0, 0):
        return
    if counts != (1, 1) or text.index(start) > text.index(end):
        raise SystemExit(f"record.py: {doc} has {counts[0]} '{start}' and {counts[1]} '{end}' markers; "
                         "leave exactly one of each, start before end, or remove both to append a new section.")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def physical_cores() -> int | None:
    """Distinct (package, core) pairs in /proc/cpuinfo; None where it cannot tell."""
    try:
        blocks = Path("/proc/cpuinfo").read_text().split("\n\n")
    except OSError:
        return None
    cores = set()
    for block in blocks:
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def machine() -> str:
    threads = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else threads
    cores = physical_cores()
    parts = [cpu_model(), f"{cores} cores" if cores else "cores unknown", f"{threads} threads"]
    if usable != threads:
        parts.append(f"{usable} usable by this process")
    parts.append(f"{platform.system()} {platform.release()}, Python {platform.python_version()}")
    return ", ".join(parts)


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "unknown (not a git checkout)"
    changed = git("status", "--porcelain", "--untracked-files=no")
    return commit + (" (with uncommitted changes to tracked files)" if changed else "")


def fence(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text``, so the output cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def section(name: str, command: list[str], output: str, code: int, seconds: float, when: datetime.datetime) -> str:
    start, end = markers(name)
    outcome = "exit 0" if code == 0 else f"exit {code} (a target missed)"
    command_line = shlex.join(command)
    output = output if output.endswith("\n") or not output else output + "\n"
    out_fence, command_fence = fence(output), fence(command_line)
    return (f"{start}\n"
            f"Recorded by bench/record.py on {when:%Y-%m-%d %H:%M} UTC; {outcome} after {seconds:.0f} s.\n"
            f"Machine: {machine()}.\n"
            f"Commit: {git_commit()}.\n"
            f"Command:\n\n{command_fence}\n{command_line}\n{command_fence}\n\n"
            f"Output:\n\n{out_fence}\n{output}{out_fence}\n"
            f"{end}")


def write_section(doc: Path, name: str, body: str) -> None:
    """Replaces the text between NAME's markers (or appends a section); the file is locked while it is rewritten,
    so two recordings finishing at once do not lose one another's section."""
    start, end = markers(name)
    with open(doc, "r+", encoding="utf-8") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        text = handle.read()
        if start in text and end in text and text.index(start) < text.index(end):
            before, after = text[:text.index(start)], text[text.index(end) + len(end):]
            text = before + body + after
        else:
            text = text + ("" if text.endswith("\n") or not text else "\n") + f"\n## {name}\n\n{body}\n"
        handle.seek(0)
        handle.write(text)
        handle.truncate()


TRACEBACK = "Traceback (most recent call last):"


def run_teeing(command: list[str]) -> tuple[int, str, str]:
    """Runs ``command``, copying its stdout and stderr to ours line by line as they come; returns (exit code,
    stdout, stderr)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # a Python child's prints arrive as they happen, not at exit
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
                                   errors="replace")
    except OSError as error:
        raise SystemExit(f"record.py: cannot start {command[0]!r}: {error.strerror}; check the command after --.") from None
    kept: dict[str, list[str]] = {"out": [], "err": []}

    def tee(stream, into: list[str], to) -> None:
        for line in stream:
            to.write(line)
            to.flush()
            into.append(line)

    err_thread = threading.Thread(target=tee, args=(process.stderr, kept["err"], sys.stderr), daemon=True)
    err_thread.start()
    try:
        tee(process.stdout, kept["out"], sys.stdout)
        code = process.wait()
        err_thread.join()
    except KeyboardInterrupt:
        process.terminate()
        process.wait()
        raise SystemExit(130) from None
    return code, "".join(kept["out"]), "".join(kept["err"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python bench/record.py NAME [--doc PATH] -- COMMAND [ARGS...]  (the -- is required)")
    split = argv.index("--")
    parser = argparse.ArgumentParser(prog="bench/record.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the section's name: bench:NAME markers in the doc")
    parser.add_argument("--doc", type=Path, default=DOC, help="the Markdown file to update (docs/benchmarks.md)")
    args = parser.parse_args(argv[:split])
    command = argv[split + 1:]
    if not NAME.fullmatch(args.name):
        raise SystemExit(f"record.py: NAME {args.name!r} must be letters, digits, '_', '.' or '-'; e.g. bench_prune.")
    if not command:
        raise SystemExit("record.py: no command after --; e.g. -- .venv/bin/python bench/bench_prune.py")
    check_doc(args.doc, args.name)

    when = datetime.datetime.now(datetime.UTC)
    started = time.monotonic()
    code, output, errors = run_teeing(command)
    seconds = time.monotonic() - started
    if code == 1 and TRACEBACK in errors:
        # Python exits 1 on an uncaught exception too: that is a crash, not a missed target.
        print(f"record.py: the command exited 1 with a Python traceback (a crash, not a missed target); "
              f"nothing recorded in {args.doc}.", file=sys.stderr)
        return code
    if code not in RECORDED_CODES:
        print(f"record.py: the command exited {code}; nothing recorded in {args.doc}.", file=sys.stderr)
        return 128 - code if code < 0 else code  # killed by a signal: the shell's 128+N
    write_section(args.doc, args.name, section(args.name, command, output, code, seconds, when))
    print(f"record.py: recorded as bench:{args.name} in {args.doc}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
