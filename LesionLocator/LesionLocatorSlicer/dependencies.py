"""LesionLocator's Python dependencies inside 3D Slicer: what is needed, what is missing, and
how to install it without ever replacing torch.

Qt-free and ``slicer``-free at import time: everything that touches Slicer comes in as a
callable (``pip_install``: ``slicer.util.pip_install``; ``install_torch``: PyTorch Utils'
``installTorch``), so the tests run it with plain functions. The file must stay loadable on
Python 3.9 (Slicer 5.8), because saying "this Slicer is too old" is its job there.

Decisions (the reasons are the review of Slicer, nnunetv2 and PyTorch Utils sources):

* Supported: 3D Slicer 5.10 or newer, which is the same thing as Python >= 3.10 here.
  nnunetv2 >= 2.8 (and this project's pyproject.toml) need Python >= 3.10; Slicer 5.8.x
  bundles Python 3.9.10 and Slicer 5.10.0 through 5.12.x bundle Python 3.12.10. No Slicer
  release bundles 3.10 or 3.11, so checking the running Python is exact and needs no
  Slicer version parsing.
* torch is never installed by pip here. When it is missing it comes from the PyTorch
  extension (light-the-torch picks the CUDA/CPU build for this computer) with a version
  requirement: ours (``torch>=2.1``) intersected with nnunetv2's own (read from the
  installed nnunetv2's metadata; for nnunetv2 2.8.1 it is ``torch!=2.9.*,>=2.1.2``).
* Everything else is one ordinary ``pip install`` with a constraints file that pins the
  installed torch, torchvision, SimpleITK, numpy and scipy to the versions installed
  (``-c``, the way Slicer 5.12's ``slicer.packaging`` recommends; ``--no-deps`` plus a
  skip-list is what it calls a discouraged workaround). A plain ``pip install nnunetv2``
  upgrades torch: timm (via dynamic-network-architectures) wants torchvision, pip takes
  the newest torchvision, which pins the newest torch, a different (CUDA) build (a dry run
  next to torch 2.13.0+cpu picked torchvision 0.29.2, torch 2.15.0, triton and 17 CUDA
  wheels). With the pins pip picks the torchvision that matches the installed torch, or
  fails with ResolutionImpossible and changes nothing. The price: timm, torchvision (when
  PyTorch Utils did not install it already) and huggingface_hub get installed although
  LesionLocator never imports them; in exchange pip's view stays whole (``pip check``
  clean, no edited METADATA) and pip itself picks an nnunetv2 >= 2.8 that fits the torch.
  Why each pin: torch/torchvision: the GPU build chosen by the PyTorch extension;
  SimpleITK: Slicer's own build (Slicer's ITK and IO), a PyPI wheel would replace it;
  numpy/scipy: compiled packages bundled with Slicer and loaded in the running session
  (replacing loaded binaries fails on Windows and mixes versions elsewhere).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import importlib.util
import io
import logging
import os
import shlex
import subprocess
import sys
import tempfile
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Sequence, Tuple, Union

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------- the facts
#: Oldest supported 3D Slicer release, and the Python it is identified by (see module docstring).
SUPPORTED_SLICER = "5.10"
MIN_PYTHON: Tuple[int, int] = (3, 10)
#: Python bundled by Slicer releases (checked in Slicer's CMakeLists.txt), for the messages.
SLICER_PYTHON = {"5.8": "3.9.10", "5.10": "3.12.10", "5.12": "3.12.10"}

#: torch range LesionLocator itself needs (pyproject.toml: torch>=2.1).
OUR_TORCH_SPECIFIER = ">=2.1"
NNUNET_REQUIREMENT = "nnunetv2>=2.8"
#: nnunetv2's torch requirement when nnunetv2 is not installed yet: the one in nnunetv2 2.8.1's
#: metadata (``importlib.metadata.requires('nnunetv2')``: 'torch!=2.9.*,>=2.1.2').
NNUNET_TORCH_SPECIFIER_FALLBACK = "!=2.9.*,>=2.1.2"


@dataclass(frozen=True)
class Package:
    """One import that LesionLocator needs. ``pip``: what pip installs when it is missing
    (None: not pip's job, torch comes from the PyTorch extension)."""
    module: str
    distribution: str
    pip: Optional[str]


#: What the module's code paths import. dynamic_network_architectures builds the network,
#: acvl_utils is imported by nnunetv2.inference.sliding_window_prediction; both come with
#: nnunetv2 (pip also installs a missing dependency of an installed nnunetv2).
PACKAGES: Tuple[Package, ...] = (
    Package("torch", "torch", None),
    Package("nnunetv2", "nnunetv2", NNUNET_REQUIREMENT),
    Package("dynamic_network_architectures", "dynamic-network-architectures", NNUNET_REQUIREMENT),
    Package("acvl_utils", "acvl-utils", NNUNET_REQUIREMENT),
    Package("SimpleITK", "SimpleITK", "SimpleITK>=2.2"),
    Package("scipy", "scipy", "scipy"),
)

#: Distributions pip must keep as installed (pinned with ``==installed`` in the constraints
#: file when installed), in this order. Why each: module docstring.
PROTECTED: Tuple[str, ...] = ("torch", "torchvision", "SimpleITK", "numpy", "scipy")
#: Versions an installed protected package must have (we never replace it: we say so).
PROTECTED_MINIMUM = {"SimpleITK": ">=2.2", "numpy": ">=1.24"}

#: Name of the constraints file written for each pip run (in a temporary folder).
CONSTRAINTS_NAME = "constraints.txt"
#: How many lines of pip's output a failure message quotes.
TAIL_LINES = 12

VersionInfo = Sequence[int]
FindSpec = Callable[[str], object]
VersionOf = Callable[[str], str]          # importlib.metadata.version: raises PackageNotFoundError
RequiresOf = Callable[[str], Optional[List[str]]]


# ------------------------------------------------------------------------------ Python / Slicer
def python_supported(version_info: Optional[VersionInfo] = None) -> bool:
    """True when this Python (default: the running one) can run LesionLocator."""
    info = sys.version_info if version_info is None else version_info
    return tuple(info[:2]) >= MIN_PYTHON


def unsupported_python_message(version_info: Optional[VersionInfo] = None) -> Optional[str]:
    """None on a supported Python, else a message naming the Slicer release needed."""
    info = sys.version_info if version_info is None else version_info
    if python_supported(info):
        return None
    running = ".".join(str(part) for part in info[:3])
    minimum = ".".join(str(part) for part in MIN_PYTHON)
    return (f"LesionLocator needs 3D Slicer {SUPPORTED_SLICER} or newer: this Slicer runs Python {running}, "
            f"and nnunetv2 needs Python {minimum} or newer (Slicer 5.8 bundles Python "
            f"{SLICER_PYTHON['5.8']}, Slicer {SUPPORTED_SLICER} bundles Python {SLICER_PYTHON[SUPPORTED_SLICER]}). "
            f"Install 3D Slicer {SUPPORTED_SLICER} or newer, then LesionLocator from its Extensions Manager.")


# ---------------------------------------------------------------------------- what is installed
def missing_packages(find_spec: Optional[FindSpec] = None) -> List[str]:
    """Import names of the needed packages that are not installed (nothing is imported)."""
    find_spec = find_spec or importlib.util.find_spec
    missing = []
    for package in PACKAGES:
        try:
            found = find_spec(package.module) is not None
        except (ImportError, ValueError):  # e.g. a module in sys.modules without __spec__
            found = sys.modules.get(package.module) is not None
        if not found:
            missing.append(package.module)
    return missing


def installed_version(distribution: str, version: Optional[VersionOf] = None) -> Optional[str]:
    """The installed version of ``distribution`` (as its metadata says), None if not installed."""
    version = version or importlib.metadata.version
    try:
        return version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _version_in(installed: str, specifier: str) -> bool:
    """``installed`` satisfies ``specifier``; pre-releases and local builds count
    (``2.10.0a0+git...`` from a source build is a torch 2.10). Explicit: packaging 25.0, the
    one Slicer 5.10 bundles, refuses pre-releases by default, packaging 26 accepts them."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version
    try:
        return SpecifierSet(specifier).contains(Version(installed), prereleases=True)
    except InvalidVersion:
        return True  # a version pip could not order either: do not claim it is wrong


# -------------------------------------------------------------------------- torch requirement
def nnunet_torch_specifier(requires: Optional[RequiresOf] = None) -> str:
    """nnunetv2's torch specifier (e.g. '!=2.9.*,>=2.1.2'): from the installed nnunetv2's
    metadata (requirements behind an extra or a false marker left out), else the verified
    nnunetv2 2.8.1 value."""
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
    requires = requires or importlib.metadata.requires
    try:
        requirements = requires("nnunetv2")
    except importlib.metadata.PackageNotFoundError:
        requirements = None
    if requirements is None:
        return NNUNET_TORCH_SPECIFIER_FALLBACK
    specifier = SpecifierSet()
    for text in requirements:
        try:
            requirement = Requirement(text)
        except InvalidRequirement:
            continue
        if requirement.name.lower() != "torch":
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        specifier &= requirement.specifier
    return str(specifier)


_LOWER = (">=", ">")
_UPPER = ("<=", "<")
_ORDER = (">=", ">", "<=", "<", "!=", "==", "~=", "===")


def combine_specifiers(*specifiers: str) -> str:
    """The intersection of version specifiers as one string, bounds first, redundant bounds
    dropped: ('>=2.1', '!=2.9.*,>=2.1.2') -> '>=2.1.2,!=2.9.*'."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version
    combined = SpecifierSet()
    for text in specifiers:
        combined &= SpecifierSet(text)
    tightest = {}
    others = []
    for spec in combined:
        if spec.operator in _LOWER + _UPPER:
            best = tightest.get(spec.operator)
            newer = Version(spec.version) > Version(best.version) if best is not None else True
            if best is None or (newer if spec.operator in _LOWER else not newer):
                tightest[spec.operator] = spec
        else:
            others.append(spec)
    kept = list(tightest.values()) + others
    kept.sort(key=lambda spec: (_ORDER.index(spec.operator) if spec.operator in _ORDER else len(_ORDER),
                                spec.version))
    return ",".join(str(spec) for spec in kept)


def torch_requirement(requires: Optional[RequiresOf] = None) -> str:
    """The torch version requirement to pass to PyTorch Utils' ``installTorch(
    torchVersionRequirement=...)`` (it is appended to 'torch'): ours and nnunetv2's."""
    return combine_specifiers(OUR_TORCH_SPECIFIER, nnunet_torch_specifier(requires))


# ------------------------------------------------------------------------------- status / plan
def version_problems(version: Optional[VersionOf] = None, requires: Optional[RequiresOf] = None) -> List[str]:
    """Installed packages that LesionLocator will not replace but whose version is wrong
    (torch outside the torch requirement, SimpleITK or numpy too old). Empty when fine."""
    problems = []
    torch_version = installed_version("torch", version)
    if torch_version is not None:
        needed = torch_requirement(requires)
        if not _version_in(torch_version, needed):
            problems.append(
                f"torch {torch_version} is installed, but LesionLocator and nnunetv2 need torch{needed}. "
                f"LesionLocator does not replace torch (the PyTorch extension chose its build for this "
                f"computer): in the PyTorch Utils module press 'Uninstall', restart Slicer, then press "
                f"'Install dependencies' here, which installs torch{needed} through the PyTorch extension.")
    for distribution, needed in PROTECTED_MINIMUM.items():
        found = installed_version(distribution, version)
        if found is not None and not _version_in(found, needed):
            problems.append(f"{distribution} {found} is installed, but LesionLocator needs {distribution}{needed}; "
                            f"it is part of 3D Slicer and is not replaced here: use 3D Slicer "
                            f"{SUPPORTED_SLICER} or newer.")
    return problems


def outdated_packages(version: Optional[VersionOf] = None) -> List[str]:
    """Import names of needed packages that pip may upgrade (not protected) and whose
    installed version is older than needed, e.g. an nnunetv2 2.5 left by another extension."""
    from packaging.requirements import Requirement
    outdated = []
    for package in PACKAGES:
        if not package.pip or package.distribution in PROTECTED:
            continue
        requirement = Requirement(package.pip)
        if requirement.name.lower() != package.distribution.lower() or not str(requirement.specifier):
            continue
        found = installed_version(package.distribution, version)
        if found is not None and not _version_in(found, str(requirement.specifier)):
            outdated.append(package.module)
    return outdated


def pip_requirements(missing: Iterable[str]) -> List[str]:
    """pip requirements for the missing import names, each once, torch left out."""
    missing = set(missing)
    requirements = []
    for package in PACKAGES:
        if package.module in missing and package.pip and package.pip not in requirements:
            requirements.append(package.pip)
    return requirements


def constraint_lines(version: Optional[VersionOf] = None) -> List[str]:
    """'name==installed version' for each installed protected distribution (local build
    labels kept: 'torch==2.5.1+cu121' is only satisfied by the build that is installed)."""
    lines = []
    for distribution in PROTECTED:
        found = installed_version(distribution, version)
        if found is not None:
            lines.append(f"{distribution}=={found}")
    return lines


def pip_arguments(requirements: Sequence[str], constraints_path: str) -> List[str]:
    """What follows 'pip install' (``slicer.util.pip_install`` takes such a list)."""
    return [*requirements, "-c", constraints_path]


def status_message(find_spec: Optional[FindSpec] = None, version: Optional[VersionOf] = None,
                   requires: Optional[RequiresOf] = None,
                   version_info: Optional[VersionInfo] = None) -> Optional[str]:
    """None when LesionLocator can run, else what is wrong or missing and how to fix it.
    Never installs anything."""
    python = unsupported_python_message(version_info)
    if python:
        return python
    missing = missing_packages(find_spec)
    lines = []
    if missing:
        lines.append(f"LesionLocator needs Python packages that are not installed: {', '.join(missing)}.")
        if "torch" in missing:
            lines.append(f"torch comes from the PyTorch extension (Extensions Manager; restart Slicer after "
                         f"installing it), which picks the build for your GPU or CPU: 'Install dependencies' "
                         f"asks it for torch{torch_requirement(requires)}.")
        others = pip_requirements(missing)
        if others:
            lines.append(f"'Install dependencies' installs {' '.join(others)} with pip, keeping the installed "
                         f"versions of {', '.join(PROTECTED[:-1])} and {PROTECTED[-1]} as they are.")
    for module in outdated_packages(version):
        package = next(package for package in PACKAGES if package.module == module)
        lines.append(f"{package.distribution} {installed_version(package.distribution, version)} is installed, but "
                     f"LesionLocator needs {package.pip}: 'Install dependencies' upgrades it (then restart Slicer).")
    lines.extend(version_problems(version, requires))
    return "\n".join(lines) if lines else None


def self_test_skip_reason(find_spec: Optional[FindSpec] = None,
                          version_info: Optional[VersionInfo] = None) -> Optional[str]:
    """None when the module's self-test can run here, else why not (for a clean skip on
    machines that build the extension without torch or nnunetv2)."""
    python = unsupported_python_message(version_info)
    if python:
        return f"LesionLocator self-test skipped: {python}"
    missing = missing_packages(find_spec)
    if not missing:
        return None
    return (f"LesionLocator self-test skipped: {missing[0]} is not installed (missing: {', '.join(missing)}); "
            f"the self-test runs the network. Install them with the LesionLocator module's "
            f"'Install dependencies' button.")


@dataclass
class InstallPlan:
    """What :func:`install` would do now. ``problem``: why it would do nothing (unsupported
    Python, a protected package with a wrong version), else None. ``torch``: the requirement
    passed to the PyTorch extension when torch is missing, else None. ``pip``: requirements
    for one pip run (empty: no pip run). ``constraints``: the pins for that run as they are
    now (torch's is added after the PyTorch extension installed it)."""
    problem: Optional[str]
    torch: Optional[str]
    pip: List[str]
    constraints: List[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.problem is None and self.torch is None and not self.pip

    def describe(self) -> str:
        """Text for a confirmation dialog."""
        if self.problem:
            return self.problem
        if self.empty:
            return "All of LesionLocator's Python packages are installed."
        lines = []
        if self.torch:
            lines.append(f"torch{self.torch} through the PyTorch extension (the build for your GPU or CPU).")
        if self.pip:
            kept = ", ".join(self.constraints) if self.constraints else "nothing installed yet"
            lines.append(f"{' '.join(self.pip)} with pip; kept as installed: {kept}"
                         f"{' and the new torch' if self.torch else ''}.")
        return "LesionLocator will install:\n" + "\n".join(lines) + "\nThis downloads several hundred MB."


def plan_install(find_spec: Optional[FindSpec] = None, version: Optional[VersionOf] = None,
                 requires: Optional[RequiresOf] = None,
                 version_info: Optional[VersionInfo] = None) -> InstallPlan:
    """What :func:`install` would do now (nothing is installed)."""
    python = unsupported_python_message(version_info)
    if python:
        return InstallPlan(python, None, [])
    problems = version_problems(version, requires)
    if problems:
        return InstallPlan("\n".join(problems), None, [])
    missing = missing_packages(find_spec)
    torch = torch_requirement(requires) if "torch" in missing else None
    pip = pip_requirements(missing + outdated_packages(version))
    return InstallPlan(None, torch, pip, constraint_lines(version))


# ------------------------------------------------------------------------------------- install
@dataclass
class InstallResult:
    """``ok``: everything needed is importable now. ``message``: for the user (what was
    done, or what failed: the command and the tail of its output). ``restart``: a package
    that was already imported in this session was replaced: restart Slicer."""
    ok: bool
    message: str
    restart: bool = False


class _Tail(io.TextIOBase):
    """A stdout that passes everything on and keeps the last lines (Slicer's pip_install
    prints pip's output line by line; its CalledProcessError carries no text)."""

    def __init__(self, stream, lines: int = 200):
        super().__init__()
        self._stream = stream
        self._partial = ""
        self.lines = deque(maxlen=lines)

    def write(self, text):
        if self._stream is not None:
            with contextlib.suppress(Exception):  # the console going away must not stop the install
                self._stream.write(text)
        self._partial += str(text)
        *complete, self._partial = self._partial.split("\n")
        self.lines.extend(complete)
        return len(text)

    def flush(self):
        if self._stream is not None:
            with contextlib.suppress(Exception):
                self._stream.flush()

    def text(self) -> str:
        return "\n".join([*self.lines, self._partial])


def _output_text(error: BaseException) -> str:
    """pip's output carried by the exception, if it is text (Slicer's carries a spent pipe)."""
    parts = []
    for name in ("output", "stderr"):
        value = getattr(error, name, None)
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str) and value.strip():
            parts.append(value)
    return "\n".join(parts)


def _tail(text: str, lines: int = TAIL_LINES) -> List[str]:
    kept = [line.rstrip() for line in text.splitlines() if line.strip()]
    return [line if len(line) <= 300 else line[:297] + "..." for line in kept[-lines:]]


def _command_text(args: Sequence[str]) -> str:
    return "pip install " + " ".join(shlex.quote(str(arg)) for arg in args)


def _failure(what: str, command: Optional[str], error: BaseException, output: str, hint: str = "") -> str:
    if isinstance(error, subprocess.CalledProcessError):  # its text repeats the whole command line
        lines = [f"{what} failed (exit status {error.returncode})."]
    else:
        lines = [f"{what} failed: {type(error).__name__}: {error}"]
    if command:
        lines.append(f"Command: {command}")
    tail = _tail(output)
    if tail:
        lines.append("Last lines of its output:")
        lines.extend("  " + line for line in tail)
    if hint:
        lines.append(hint)
    return "\n".join(lines)


def _reporter(report: Callable[[str], object]) -> Callable[[str], None]:
    """``report`` that never raises: a failing report is logged and the install goes on."""
    def say(text):
        try:
            report(text)
        except Exception:
            logger.exception("LesionLocator: report failed")
    return say


def _plan_or_result(say: Callable[[str], None], find_spec: Optional[FindSpec], version: Optional[VersionOf],
                    requires: Optional[RequiresOf],
                    version_info: Optional[VersionInfo]) -> Union[InstallPlan, InstallResult]:
    """The plan to carry out, or the final result when there is nothing to do or nothing may be
    done (planning failed, unsupported Python, a protected package with a wrong version)."""
    try:
        plan = plan_install(find_spec, version, requires, version_info)
    except Exception as error:  # e.g. unreadable metadata
        logger.exception("LesionLocator: planning the install failed")
        message = _failure("Checking LesionLocator's Python packages", None, error, "")
        say(message)
        return InstallResult(False, message)
    if plan.problem:
        say(plan.problem)
        return InstallResult(False, plan.problem)
    if plan.empty:
        message = "All of LesionLocator's Python packages are installed."
        say(message)
        return InstallResult(True, message)
    return plan


def _torch_failure(requirement: str, error: BaseException, tail: _Tail) -> str:
    """The message for an exception (or SystemExit) raised by the PyTorch extension's install."""
    command = getattr(error, "cmd", None)
    if isinstance(command, (list, tuple)):
        command = " ".join(str(part) for part in command)
    return _failure(
        f"Installing torch{requirement} with the PyTorch extension",
        command or f"PyTorchUtilsLogic().installTorch(torchVersionRequirement={requirement!r})",
        error, _output_text(error) or tail.text(),
        hint="If the PyTorch extension is missing: install it from the Extensions Manager and restart Slicer.")


def _install_torch_step(requirement: str, install_torch: Optional[Callable[[str], object]],
                        say: Callable[[str], None], version: Optional[VersionOf]) -> Union[str, InstallResult]:
    """Install ``torch<requirement>`` through the PyTorch extension; returns what was installed
    (``"torch X.Y"``), or the failed :class:`InstallResult` (already reported)."""
    if install_torch is None:
        message = (f"torch is not installed: install the PyTorch extension (Extensions Manager), restart "
                   f"Slicer, then install torch{requirement} with it (PyTorch Utils module).")
        say(message)
        return InstallResult(False, message)
    say(f"Installing torch{requirement} with the PyTorch extension (this can take several minutes)...")
    tail = _Tail(sys.stdout)
    try:
        with contextlib.redirect_stdout(tail):
            result = install_torch(requirement)
    except (Exception, SystemExit) as error:
        logger.exception("LesionLocator: installing torch failed")
        message = _torch_failure(requirement, error, tail)
        say(message)
        return InstallResult(False, message)
    if result is None:
        message = "Installing torch was cancelled: nothing was changed."
        say(message)
        return InstallResult(False, message)
    importlib.invalidate_caches()
    torch_version = installed_version("torch", version)
    if torch_version is None or not _version_in(torch_version, requirement):
        message = (f"The PyTorch extension installed torch {torch_version or '(none)'}, but LesionLocator "
                   f"needs torch{requirement}: install a matching torch in the PyTorch Utils module.")
        say(message)
        return InstallResult(False, message)
    return f"torch {torch_version}"


def _pip_failure(error: BaseException, tail: _Tail, command: str, pins: List[str]) -> str:
    """The message for a failed pip run: its command, output tail and what the pins had to do with it."""
    output = _output_text(error) or tail.text()
    hint = ""
    if "ResolutionImpossible" in output or "conflicting dependencies" in output:
        hint = (f"pip found no versions that work with the installed {', '.join(pins)} "
                f"(kept as installed on purpose, nothing of them was changed).")
    message = _failure("Installing LesionLocator's Python packages", command, error, output, hint)
    if not hint:
        message += f"\n{CONSTRAINTS_NAME}: {', '.join(pins) or '(empty)'}"
    return message


def _install_pip_step(requirements: List[str], pip_install: Callable[[List[str]], object],
                      say: Callable[[str], None], version: Optional[VersionOf]) -> Union[str, InstallResult]:
    """One ``pip install`` of ``requirements`` with the installed protected packages pinned by a
    constraints file; returns what was installed, or the failed :class:`InstallResult` (already
    reported; ``restart`` set when pip changed torch after all)."""
    pins = constraint_lines(version)  # again: torch may be new
    torch_before = installed_version("torch", version)
    with tempfile.TemporaryDirectory(prefix="LesionLocatorPip") as folder:
        constraints = os.path.join(folder, CONSTRAINTS_NAME)
        with open(constraints, "w", encoding="utf-8") as file:
            file.write("".join(pin + "\n" for pin in pins))
        args = pip_arguments(requirements, constraints)
        command = _command_text(pip_arguments(requirements, CONSTRAINTS_NAME))  # the folder is temporary
        say(f"Installing {' '.join(requirements)} with pip, keeping {', '.join(pins) or 'nothing'} "
            f"as installed (this can take several minutes)...")
        tail = _Tail(sys.stdout)
        try:
            with contextlib.redirect_stdout(tail):
                pip_install(args)
        except (Exception, SystemExit) as error:
            logger.exception("LesionLocator: pip install failed")
            message = _pip_failure(error, tail, command, pins)
            say(message)
            return InstallResult(False, message)
    importlib.invalidate_caches()
    torch_after = installed_version("torch", version)
    if torch_after != torch_before:
        message = (f"pip changed torch from {torch_before} to {torch_after} although it was pinned "
                   f"(command: {command}); check torch in the PyTorch Utils module.")
        say(message)
        return InstallResult(False, message, restart=True)
    return " ".join(requirements)


def _final_result(done: List[str], loaded_outdated: List[str], find_spec: Optional[FindSpec],
                  say: Callable[[str], None]) -> InstallResult:
    """After the installs: is everything importable now, and does Slicer need a restart?"""
    importlib.invalidate_caches()
    still = missing_packages(find_spec)
    if still:
        message = f"Installed {', '.join(done)}, but still missing: {', '.join(still)}. Restart Slicer and try again."
        say(message)
        return InstallResult(False, message, restart=True)
    restart = bool(loaded_outdated)
    message = f"Installed {', '.join(done)}." + (" Restart 3D Slicer before using LesionLocator." if restart else "")
    say(message)
    return InstallResult(True, message, restart)


def install(pip_install: Callable[[List[str]], object],
            install_torch: Optional[Callable[[str], object]] = None,
            report: Callable[[str], object] = print, *,
            find_spec: Optional[FindSpec] = None, version: Optional[VersionOf] = None,
            requires: Optional[RequiresOf] = None,
            version_info: Optional[VersionInfo] = None) -> InstallResult:
    """Install what is missing, never replacing torch (nor the other protected packages).

    ``pip_install(args)``: runs 'pip install *args' and raises on failure
    (``slicer.util.pip_install``). ``install_torch(requirement)``: installs torch for
    this computer and returns None when the user declined (PyTorch Utils:
    ``lambda r: PyTorchUtilsLogic().installTorch(askConfirmation=True,
    torchVersionRequirement=r)``); None: torch is not installed here. ``report``: progress
    messages. Every failure (pip's CalledProcessError or anything else) becomes an
    :class:`InstallResult` whose message names the command and quotes its output's tail;
    nothing is raised. ``find_spec``/``version``/``requires``/``version_info``: for tests.
    """
    say = _reporter(report)
    plan = _plan_or_result(say, find_spec, version, requires, version_info)
    if isinstance(plan, InstallResult):
        return plan
    # a package pip upgrades while the old one is imported in this session needs a restart
    loaded_outdated = [module for module in outdated_packages(version) if module in sys.modules]
    done = []
    if plan.torch is not None:
        outcome = _install_torch_step(plan.torch, install_torch, say, version)
        if isinstance(outcome, InstallResult):
            return outcome
        done.append(outcome)
    if plan.pip:
        outcome = _install_pip_step(plan.pip, pip_install, say, version)
        if isinstance(outcome, InstallResult):
            return outcome
        done.append(outcome)
    return _final_result(done, loaded_outdated, find_spec, say)


# ------------------------------------------------------------------------------- Slicer glue
def pytorch_utils_install_torch(requirement: str, ask_confirmation: bool = True):
    """Install torch through the PyTorch extension (``PyTorchUtilsLogic.installTorch``:
    light-the-torch, 'torch<requirement>' plus a matching torchvision). Returns the torch
    module, or None when the user declined; raises when the extension is missing or the
    install fails (``install`` turns that into a message)."""
    try:
        import PyTorchUtils  # the PyTorch extension's module, only inside Slicer
    except ImportError as error:
        raise RuntimeError("the PyTorch extension is not installed (Extensions Manager: PyTorch; "
                           "restart Slicer after installing it)") from error
    return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=ask_confirmation,
                                                        torchVersionRequirement=requirement)


def install_in_slicer(report: Callable[[str], object] = print, ask_confirmation: bool = True,
                      **checks) -> Optional[str]:
    """:func:`install` with ``slicer.util.pip_install`` and the PyTorch extension (both
    imported here, not at module load). None when everything is installed (the final
    message, a restart note included, went to ``report``), else the message to show.
    ``checks``: :func:`install`'s keywords, for tests."""
    try:
        import slicer.util
        pip_install = slicer.util.pip_install
    except (ImportError, AttributeError) as error:  # not inside Slicer
        return f"3D Slicer's Python is needed to install LesionLocator's packages: {type(error).__name__}: {error}"
    result = install(pip_install, lambda requirement: pytorch_utils_install_torch(requirement, ask_confirmation),
                     report, **checks)
    return None if result.ok else result.message
