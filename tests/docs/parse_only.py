"""Check a documented command's arguments without running it: ``python parse_only.py ARGV...``.

Used for commands marked ``gpu`` on a machine without one and for those marked ``parse``: the
program's own ``argparse`` parser reads the arguments as written (a renamed or removed flag, a
bad choice or a missing file argument's flag fails here), then the program stops before doing
anything.  ``python parse_only.py --python FILE`` compiles a Python snippet and runs only its
imports (the names it uses from seqpar must exist).

Exit status 0: the arguments parse; otherwise argparse's own message and status 2.
"""
from __future__ import annotations

import argparse
import ast
import runpy
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class Parsed(BaseException):
    """Raised once the program's parser accepted the arguments (BaseException: no handler swallows it)."""


def _stop_after_parse() -> None:
    """Make the program's outermost ``parse_args`` / ``parse_known_args`` raise :class:`Parsed` once it
    has accepted the arguments (subparsers parse inside it: only the outermost call stops)."""
    real_known, real_args = argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args
    state = {"depth": 0, "in_parse_args": False}

    def parse_known_args(self, args=None, namespace=None):
        state["depth"] += 1
        try:
            result = real_known(self, args, namespace)
        finally:
            state["depth"] -= 1
        if state["depth"] == 0 and not state["in_parse_args"]:
            raise Parsed
        return result

    def parse_args(self, args=None, namespace=None):
        state["in_parse_args"] = True
        try:
            real_args(self, args, namespace)  # errors on unrecognized arguments, as the program would
        finally:
            state["in_parse_args"] = False
        raise Parsed

    argparse.ArgumentParser.parse_known_args = parse_known_args  # type: ignore[method-assign]
    argparse.ArgumentParser.parse_args = parse_args  # type: ignore[method-assign]


def _run_target(module: str | None, script: str | None, args: list[str]) -> None:
    _stop_after_parse()
    if module:
        sys.argv = [module, *args]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        path = Path(script)  # type: ignore[arg-type]
        if not path.is_file():
            raise SystemExit(f"parse_only: no such script {script!r}")
        sys.argv = [str(path), *args]
        sys.path.insert(0, str(path.parent))
        runpy.run_path(str(path), run_name="__main__")
    raise SystemExit(f"parse_only: {module or script} finished without parsing any arguments")


def _extras() -> set[str]:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["project"].get("optional-dependencies", {}))


def check_argv(argv: list[str]) -> None:
    """Parse one command line; return normally when its arguments are accepted."""
    while argv and "=" in argv[0] and not argv[0].startswith("-"):
        argv = argv[1:]  # VAR=value prefixes
    prog, args = argv[0], argv[1:]
    if prog == "seqpar":
        return _guard(lambda: _run_target("seqpar.cli", None, args))
    if prog in ("python", "python3"):
        if args[:1] == ["-m"]:
            return _guard(lambda: _run_target(args[1], None, args[2:]))
        return _guard(lambda: _run_target(None, args[0], args[1:]))
    if prog == "torchrun":
        from torch.distributed.run import get_args_parser

        ns = get_args_parser().parse_args(args)
        if ns.module:
            return _guard(lambda: _run_target(ns.training_script, None, ns.training_script_args))
        return _guard(lambda: _run_target(None, ns.training_script, ns.training_script_args))
    if prog == "pip":
        return check_pip(args)
    raise SystemExit(f"parse_only: cannot parse the arguments of {prog!r}")


def check_pip(args: list[str]) -> None:
    """``pip install ...``: every extra named for this project (``.[x]``, ``seqpar[x]``) exists."""
    known = _extras()
    for a in args:
        if "[" in a and (a.startswith(".") or a.startswith("seqpar")):
            wanted = a[a.index("[") + 1:a.rindex("]")].split(",")
            missing = [w for w in wanted if w.strip() not in known]
            if missing:
                raise SystemExit(f"pip install {a}: pyproject.toml has no extra {missing}; extras: {sorted(known)}")


def _guard(fn) -> None:
    try:
        fn()
    except Parsed:
        return


def check_python(path: str) -> None:
    """Compile a snippet and run its top-level imports only."""
    source = Path(path).read_text()
    tree = ast.parse(source, path)
    imports = ast.Module(body=[n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))], type_ignores=[])
    exec(compile(imports, path, "exec"), {"__name__": "__docs__"})


def main() -> None:
    if sys.argv[1:2] == ["--python"]:
        check_python(sys.argv[2])
        return
    if sys.argv[1:2] == ["--line"]:  # one shell command line, as written
        check_argv(shlex.split(sys.argv[2], comments=True))
        return
    check_argv(sys.argv[1:])


if __name__ == "__main__":
    main()
