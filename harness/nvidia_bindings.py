"""The TensorRT and CUDA code checked against NVIDIA's real Python bindings, on a machine without a GPU.

    python -m harness.nvidia_bindings            every .venv/tensorrt-<version>/ that `make setup` made

TensorRT's Python bindings (the `tensorrt-cu13-bindings` wheel, module tensorrt_bindings) import
only over TensorRT's libraries, which come from NVIDIA's own index. They take nine functions from
those libraries (factories and plugin registries): harness/nvidia_bindings.c defines them, each
answering null, compiled here into build/ under the libraries' names. Over those stubs the bindings
import whole: every class, method, property and enum, with the signatures pybind11 documents;
nothing runs (trt.Builder(logger) raises, its factory having returned null). cuda-python's runtime
module imports without a GPU as it is (its calls then answer cudaErrorInsufficientDriver).

A child process with the stubs on LD_LIBRARY_PATH reads the sources in RECEIVERS and checks every
use they make of `tensorrt` and of cuda-python: each attribute exists, a property assigned has a
setter, each call binds to one of the documented signatures (its positional count and keyword
names), each `from cuda... import` resolves, and each name RECEIVERS declares is used (so the
declaration cannot go stale). Only expressions whose object it knows are checked (RECEIVERS, the
imports, and what their documented methods return): a call through a local alias, such as
runtime/tensorrt.py's `free(handle)` over cudaFree and cudaFreeHost, is not. It also runs what can run there: export/engine.py's
`strongly_typed_flags` on the real enum, and its progress monitor made over the real
IProgressMonitor and called as TensorRT calls it. What cannot be checked this way: what TensorRT
does with the calls (the gpu-marked tests).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import importlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = Path(__file__).with_suffix(".c")
BUILD = ROOT / "build"
VENV = ROOT / ".venv"
LIBRARIES = ("libnvinfer", "libnvonnxparser", "libnvinfer_plugin")
# Where names bound by `import tensorrt as trt` and `from cuda... import ...` lead.
MODULES = {"tensorrt": "tensorrt_bindings", "cudart": "cuda.bindings.runtime"}
# What each name holds where the project's code meets NVIDIA's APIs, file by file ("module" or
# "module.Class" for an instance of that class); keys are expressions as ast.unparse writes them.
RECEIVERS = {
    "export/engine.py": {
        "trt": "tensorrt", "builder": "tensorrt.Builder", "network": "tensorrt.INetworkDefinition",
        "config": "tensorrt.IBuilderConfig", "parser": "tensorrt.OnnxParser",
        "profile": "tensorrt.IOptimizationProfile",
        "parser.get_error(0)": "tensorrt.ParserError",  # documented as returning nvonnxparser::IParserError
    },
    "runtime/tensorrt.py": {
        "trt": "tensorrt", "self._runtime": "tensorrt.Runtime", "self._engine": "tensorrt.ICudaEngine",
        "engine": "tensorrt.ICudaEngine", "self._context": "tensorrt.IExecutionContext",
        "cudart": "cudart",
    },
    "runtime/cuda.py": {"trt": "tensorrt", "cudart": "cudart", "props": "cudart.cudaDeviceProp"},
}


class BindingsError(RuntimeError):
    """The bindings cannot be loaded here (the message says why)."""


def unavailable() -> str | None:
    """Why the check cannot run here, or None."""
    if sys.platform != "linux":
        return f"the stub libraries are Linux shared objects, not {sys.platform}"
    if not compiler():
        return "no C compiler (cc or gcc) to build harness/nvidia_bindings.c"
    return None


def compiler() -> str | None:
    return shutil.which("cc") or shutil.which("gcc")


def pinned_versions(makefile: Path = ROOT / "Makefile") -> list[str]:
    """The TensorRT versions whose bindings `make setup` installs (the Makefile's TENSORRT_BINDINGS)."""
    match = re.search(r"^TENSORRT_BINDINGS :=(.*)$", makefile.read_text(), re.M)
    return match.group(1).split() if match else []


def bindings_folders(venv: Path = VENV) -> list[Path]:
    """The folders `make setup` installed TensorRT's bindings into, one per pinned version (a folder
    of a version no longer pinned is not checked)."""
    folders = [venv / f"tensorrt-{version}" for version in pinned_versions()]
    return [folder for folder in folders if (folder / "tensorrt_bindings").is_dir()]


def stub_libraries(major: str, build: Path = BUILD) -> Path:
    """The folder of the stub libraries for TensorRT `major`, compiled once per version of the source."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
    folder = build / f"nvidia_stubs.{digest}" / major
    if all((folder / f"{name}.so.{major}").exists() for name in LIBRARIES):
        return folder
    if why := unavailable():
        raise BindingsError(why)
    folder.mkdir(parents=True, exist_ok=True)
    for name in LIBRARIES:
        soname = f"{name}.so.{major}"
        partial = folder / f"{soname}.{os.getpid()}.tmp"
        done = subprocess.run([compiler(), "-shared", "-fPIC", f"-Wl,-soname,{soname}", "-o", str(partial),
                               str(SOURCE)], capture_output=True, text=True)
        if done.returncode:
            raise BindingsError(f"cannot compile {SOURCE.name}: {done.stderr.strip().splitlines()[-1:]}")
        partial.replace(folder / soname)
    return folder


def check(folder: Path, sources: dict | None = None) -> dict:
    """Check `sources` (default RECEIVERS) against the bindings in `folder` (a .venv/tensorrt-<version>/),
    in a child over the stubs; its report: {"tensorrt", "checked", "optional", "problems", "ran"}."""
    if not (folder / "tensorrt_bindings").is_dir():  # else the child's ModuleNotFoundError traceback
        raise BindingsError(f"{folder}: no TensorRT bindings in it (tensorrt_bindings/; make setup installs them "
                            "in .venv/tensorrt-<version>/)")
    version = folder.name.removeprefix("tensorrt-")
    stubs = stub_libraries(version.split(".")[0])
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(stubs), env.get("LD_LIBRARY_PATH")]))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(folder), str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "harness.nvidia_bindings", "--child",
                           json.dumps(sources or RECEIVERS)], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    if done.returncode:
        last = (done.stderr.strip().splitlines() or [f"status {done.returncode}"])[-1]  # the exception, not its traceback
        raise BindingsError(f"{folder}: the check failed: {last}")
    return json.loads(done.stdout)


# The child: signatures, then the walk over the sources.

def split_top(text: str) -> tuple[list[str], str]:
    """A pybind11 parameter list `a: X, b: Y = <E.v: 2>) -> R` split at its top-level commas, and the
    text after its closing parenthesis."""
    depth, parts, current = 0, [], ""
    for i, ch in enumerate(text):
        if ch == ")" and depth == 0:
            parts.append(current)
            return [p.strip() for p in parts if p.strip()], text[i + 1:]
        depth += ch in "([{<"
        depth -= ch in ")]}>" and not (ch == ">" and text[i - 1:i] == "-")
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    raise ValueError(f"unbalanced signature: {text[:80]}")


def documented(function, name: str) -> list[tuple[inspect.Signature, str]]:
    """(signature, return annotation) of each overload pybind11 wrote at the head of the docstring;
    an overload Python cannot express (a parameter named `in`, a default before a required one) is
    left out, so that a call to it reads as undocumented, never as checked."""
    found = []
    for line in (function.__doc__ or "").splitlines():
        match = re.match(rf"^(?:\d+\. )?{re.escape(name)}\((.*)$", line.strip())
        if not match or match.group(1).startswith("*args, **kwargs)"):
            continue
        try:
            params, tail = split_top(match.group(1))
            parameters = []
            for param in params:
                pname = param.split(":")[0].split("=")[0].strip()
                if pname in ("/", "*"):  # positional-only and keyword-only markers
                    continue
                if pname.startswith("**"):
                    parameters.append(inspect.Parameter(pname[2:], inspect.Parameter.VAR_KEYWORD))
                elif pname.startswith("*"):
                    parameters.append(inspect.Parameter(pname[1:], inspect.Parameter.VAR_POSITIONAL))
                else:
                    default = None if "=" in param else inspect.Parameter.empty
                    parameters.append(inspect.Parameter(pname, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                        default=default))
            found.append((inspect.Signature(parameters), tail.strip().removeprefix("->").strip()))
        except ValueError:
            continue
    return found


def signatures(function, name: str, bound: bool) -> list[tuple[inspect.Signature, str]]:
    """The signatures a call of `function` can bind to (without `self` where `bound`), and what each
    returns: Python's own where it says more than (*args, **kwargs), else pybind11's docstring."""
    found = []
    try:
        signature = inspect.signature(function)  # Python and Cython functions
        kinds = {p.kind for p in signature.parameters.values()}
        if not kinds or not kinds <= {inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
            found = [(signature, "")]
    except (TypeError, ValueError):
        pass
    found = found or documented(function, name)
    if bound:  # a method read off its class: its first parameter is the instance
        found = [(s.replace(parameters=list(s.parameters.values())[1:]), r) for s, r in found
                 if list(s.parameters)[:1] == ["self"]]
    return found


class Checker:
    """Walks one source file, resolving what each expression holds from RECEIVERS and the imports."""

    def __init__(self, path: str, receivers: dict, modules: dict, report: dict):
        self.path, self.modules, self.report = path, modules, report
        self.known = {expr: self.lookup(what) for expr, what in receivers.items()}
        self.used = set()

    def lookup(self, what: str):
        """("module" | "class" | "instance", object) for "tensorrt", "tensorrt.Builder"."""
        module, _, cls = what.partition(".")
        if not cls:
            return "module", self.modules[module]
        return "instance", getattr(self.modules[module], cls)

    def problem(self, node, text: str) -> None:
        self.report["problems"].append((self.path, node.lineno, text))

    def resolve(self, node):
        """What `node` holds, as lookup's pairs, or None where that is unknown (or not NVIDIA's)."""
        text = ast.unparse(node)
        if text in self.known:
            self.used.add(text)
            return self.known[text]
        if isinstance(node, ast.Attribute):
            owner = self.resolve(node.value)
            member = self.member(owner, node.attr)
            return ("class", member) if isinstance(member, type) else None
        if isinstance(node, ast.Call):
            target = self.callable(node.func)
            if target is None:
                return None
            kind, function, _ = target
            if kind == "class":
                return "instance", function
            returns = [r for _, r in signatures(function, getattr(function, "__name__", ""), kind == "method")]
            for annotation in returns:
                cls = self.annotated_class(annotation)
                if cls is not None:
                    return "instance", cls
        return None

    def annotated_class(self, annotation: str):
        """The class a return annotation names ("tensorrt_bindings.tensorrt.ITensor"), or None."""
        package, _, name = annotation.rpartition(".")
        for module in self.modules.values():
            if package.startswith(module.__name__) and isinstance(getattr(module, name, None), type):
                return getattr(module, name)
        return None

    def name(self, owner) -> str:
        kind, obj = owner
        if kind == "module":
            return next((key for key, module in self.modules.items() if module is obj), obj.__name__)
        return obj.__name__

    @staticmethod
    def member(owner, attr: str):
        return None if owner is None else getattr(owner[1], attr, None)

    def callable(self, func):
        """("class" | "method" | "function", the callable, its owner's name) for a call's target, or None."""
        if isinstance(func, ast.Attribute):
            owner = self.resolve(func.value)
            member = self.member(owner, func.attr)
            if member is None:
                return None
            if isinstance(member, type):
                return "class", member, self.name(owner)
            return ("method" if owner[0] == "instance" else "function"), member, self.name(owner)
        if isinstance(func, ast.Name) and func.id in self.known:
            self.used.add(func.id)
            obj = self.known[func.id][1]
            return ("class" if isinstance(obj, type) else "function"), obj, ""
        return None

    def visit(self, tree) -> None:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                self.imports(node)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                self.attribute(node)
            elif isinstance(node, ast.Call):
                self.call(node)

    def imports(self, node) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in self.modules:
                    self.known[alias.asname or alias.name] = ("module", self.modules[alias.name])
            return
        if not (node.module or "").startswith(("cuda", "tensorrt")):
            return
        try:
            module = importlib.import_module(node.module)
        except ImportError as exc:
            self.problem(node, f"from {node.module} import ...: {exc}")
            return
        for alias in node.names:
            value = getattr(module, alias.name, None)
            if value is None:
                self.problem(node, f"{node.module} has no {alias.name}")
                continue
            self.report["checked"].add(f"{node.module}.{alias.name}")
            kind = "module" if inspect.ismodule(value) else "class" if isinstance(value, type) else "function"
            self.known[alias.asname or alias.name] = (kind, value)

    def attribute(self, node) -> None:
        owner = self.resolve(node.value)
        if owner is None:
            return
        where = f"{self.name(owner)}.{node.attr}"
        member = self.member(owner, node.attr)
        if member is None:
            self.problem(node, f"{where}: no such attribute")
            return
        if isinstance(node.ctx, ast.Store):
            if isinstance(member, property) and member.fset is None:
                self.problem(node, f"{where}: read-only")
            where += "="
        self.report["checked"].add(where)

    def call(self, node) -> None:
        if isinstance(node.func, ast.Name) and node.func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            owner, attr = self.resolve(node.args[0]), node.args[1]
            if owner is not None and isinstance(attr, ast.Constant):
                present = self.member(owner, attr.value) is not None
                self.report["optional"][f"{self.name(owner)}.{attr.value}"] = present
            return
        target = self.callable(node.func)
        if target is None:
            return
        kind, function, owner = target
        name = function.__name__ if kind == "class" else ast.unparse(node.func).rsplit(".", 1)[-1]
        shown = f"{owner}.{name}()" if owner else f"{name}()"
        if kind == "class":
            found = signatures(function.__init__, "__init__", bound=True)
        else:
            found = signatures(function, name, bound=kind == "method")
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return
        if not found:
            self.problem(node, f"{shown}: no signature documented")
            return
        args, kwargs = [None] * len(node.args), {k.arg: None for k in node.keywords}
        for signature, _ in found:
            try:
                signature.bind(*args, **kwargs)
                break
            except TypeError:
                continue
        else:
            given = ", ".join(["_"] * len(args) + [f"{k}=" for k in kwargs])
            self.problem(node, f"{shown} called ({given}) matches none of: "
                               + " | ".join(str(s) for s, _ in found))
            return
        self.report["checked"].add(shown)


def exercise(trt, report: dict) -> None:
    """What runs over the bindings without TensorRT's libraries."""
    from export.engine import progress_monitor, strongly_typed_flags

    report["ran"]["strongly_typed_flags"] = strongly_typed_flags(trt)
    monitor = progress_monitor(trt)
    report["ran"]["progress_monitor_is_IProgressMonitor"] = isinstance(monitor, trt.IProgressMonitor)
    # As TensorRT calls it: positionally, with the arguments its documentation names.
    monitor.phase_start("Building", None, 2)
    answers = [monitor.step_complete("Building", step) for step in range(2)]
    monitor.phase_finish("Building")
    report["ran"]["progress_monitor_steps"] = answers
    for method in ("phase_start", "step_complete", "phase_finish"):
        (base, _), = signatures(getattr(trt.IProgressMonitor, method), method, bound=True)
        ours = inspect.signature(getattr(monitor, method))
        if list(ours.parameters) != list(base.parameters):
            report["problems"].append(("export/engine.py", None, f"Monitor.{method}{ours} is not IProgressMonitor's {base}"))


def child(sources: dict) -> dict:
    import tensorrt_bindings as trt

    modules = {key: importlib.import_module(name) for key, name in MODULES.items()}
    report = {"tensorrt": trt.__version__, "checked": set(), "optional": {}, "problems": [], "ran": {}}
    for path, receivers in sources.items():
        checker = Checker(path, receivers, modules, report)
        checker.visit(ast.parse((ROOT / path).read_text()))
        for unused in sorted(set(receivers) - checker.used):
            report["problems"].append((path, None, f"{unused!r} is declared in RECEIVERS but not used there"))
    exercise(trt, report)
    report["checked"] = sorted(report["checked"])
    # In each file's order, then what concerns a file as a whole.
    report["problems"] = [f"{path}:{line}: {text}" if line else f"{path}: {text}"
                          for path, line, text in sorted(report["problems"], key=lambda p: (p[0], p[1] or 1 << 30))]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.nvidia_bindings", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*", type=Path, help="default: every .venv/tensorrt-<version>/")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return 0
    folders = args.folders or bindings_folders()
    if not folders:
        print("error: no TensorRT bindings in .venv/tensorrt-*/ (make setup installs them)", file=sys.stderr)
        return 2
    failed = False
    for folder in folders:
        try:
            report = check(folder)
        except BindingsError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        failed |= bool(report["problems"])
        print(f"TensorRT {report['tensorrt']}: {len(report['checked'])} uses checked, "
              f"{len(report['problems'])} problems; optional: {report['optional']}")
        for line in report["problems"]:
            print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
