"""LesionLocator/LesionLocatorSlicer/dependencies.py without Slicer: the supported Python,
what is missing, the torch requirement, the install plan (pip with a constraints file that
keeps torch) and the installer's failure messages, through fake callables.

The module is loaded from its file (the package's ``__init__`` may need Slicer); it must not
use relative imports for that.
"""
import ast
import importlib.metadata
import importlib.util
import io
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "LesionLocator" / "LesionLocatorSlicer" / "dependencies.py"


def _load():
    name = "lesionlocator_slicer_dependencies_under_test"
    spec = importlib.util.spec_from_file_location(name, SOURCE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


deps = _load()

# importlib.metadata.requires('nnunetv2') of nnunetv2 2.8.1, as installed in the project's venv
NNUNET_281_REQUIRES = [
    'torch!=2.9.*,>=2.1.2', 'acvl-utils<0.3,>=0.2.6', 'dynamic-network-architectures<0.5,>=0.4.4', 'tqdm',
    'scipy', 'batchgenerators>=0.25.1', 'numpy>=1.24', 'scikit-learn', 'scikit-image>=0.19.3',
    'SimpleITK>=2.2.1', 'pandas', 'graphviz', 'tifffile', 'requests', 'nibabel', 'matplotlib', 'seaborn',
    'imagecodecs', 'yacs', 'batchgeneratorsv2>=0.3.2', 'einops', 'blosc2>=3.3.2', 'pre-commit; extra == "dev"',
    'torch<2.3; extra == "intel-macos"', 'numpy<2; extra == "intel-macos"']

SLICER_510 = {"torch": "2.5.1+cu121", "torchvision": "0.20.1+cu121", "SimpleITK": "2.5.2", "numpy": "2.0.2",
              "scipy": "1.13.1"}
SLICER_510_PINS = "torch==2.5.1+cu121\ntorchvision==0.20.1+cu121\nSimpleITK==2.5.2\nnumpy==2.0.2\nscipy==1.13.1\n"
NNUNET_MODULES = ["nnunetv2", "dynamic_network_architectures", "acvl_utils"]


class FakeEnv:
    """Installed distributions (name -> version) and missing import names; pip and the
    PyTorch extension fakes change them like the real ones would."""

    def __init__(self, versions, missing=(), requires=None):
        self.versions = dict(versions)
        self.missing = set(missing)
        self._requires = requires
        self.calls = []

    def find_spec(self, name):
        return None if name in self.missing else object()

    def version(self, name):
        for key, value in self.versions.items():
            if key.lower().replace("_", "-") == name.lower().replace("_", "-"):
                return value
        raise importlib.metadata.PackageNotFoundError(name)

    def requires(self, name):
        if self._requires is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return self._requires

    def checks(self, **extra):
        return dict(find_spec=self.find_spec, version=self.version, requires=self.requires, **extra)

    # fakes of slicer.util.pip_install and PyTorch Utils' installTorch
    def pip_install(self, args):
        constraints = args[args.index("-c") + 1]
        self.calls.append(("pip", list(args), Path(constraints).read_text(encoding="utf-8"), constraints))
        self.missing -= {"nnunetv2", "dynamic_network_architectures", "acvl_utils", "SimpleITK", "scipy"}
        self.versions["nnunetv2"] = "2.8.1"

    def install_torch(self, requirement):
        self.calls.append(("torch", requirement))
        self.missing.discard("torch")
        self.versions["torch"] = "2.13.0+cu130"
        self.versions["torchvision"] = "0.28.0+cu130"
        return types.ModuleType("torch")


# ---------------------------------------------------------------------------- the module itself
def test_loads_on_python_39_without_slicer_qt_or_torch():
    """Slicer 5.8 (Python 3.9) must be able to load the file to say it is too old, and
    loading it imports none of slicer, qt, vtk, torch, nnunetv2."""
    ast.parse(SOURCE.read_text(encoding="utf-8"), feature_version=(3, 9))
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('d', {str(SOURCE)!r})\n"
            "m = importlib.util.module_from_spec(spec); sys.modules['d'] = m; spec.loader.exec_module(m)\n"
            "m.status_message(); m.self_test_skip_reason(); m.plan_install()\n"
            "heavy = ('slicer', 'qt', 'vtk', 'torch', 'nnunetv2', 'PyTorchUtils')\n"
            "print(sorted(n for n in heavy if n in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ Python / Slicer
def test_supported_range_is_python_310_that_is_slicer_510():
    assert deps.MIN_PYTHON == (3, 10) and deps.SUPPORTED_SLICER == "5.10"
    assert not deps.python_supported((3, 9, 10))      # Slicer 5.8.x
    assert deps.python_supported((3, 10, 0))
    assert deps.python_supported((3, 12, 10))         # Slicer 5.10.0 .. 5.12.x
    assert deps.unsupported_python_message((3, 12, 10)) is None
    assert deps.unsupported_python_message() is None  # this venv: Python >= 3.10


def test_unsupported_python_message_exact(monkeypatch):
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    message = deps.unsupported_python_message()
    plan = deps.plan_install()
    status = deps.status_message()
    skip = deps.self_test_skip_reason()
    monkeypatch.undo()
    expected = ("LesionLocator needs 3D Slicer 5.10 or newer: this Slicer runs Python 3.9.10, and nnunetv2 needs "
                "Python 3.10 or newer (Slicer 5.8 bundles Python 3.9.10, Slicer 5.10 bundles Python 3.12.10). "
                "Install 3D Slicer 5.10 or newer, then LesionLocator from its Extensions Manager.")
    assert message == expected
    assert status == expected
    assert (plan.problem, plan.torch, plan.pip) == (expected, None, [])
    assert skip == "LesionLocator self-test skipped: " + expected


# ---------------------------------------------------------------------------- what is installed
def test_missing_packages_asks_find_spec_for_each_import_name():
    asked = []

    def find_spec(name):
        asked.append(name)
        return None if name in ("acvl_utils", "torch") else object()

    assert deps.missing_packages(find_spec) == ["torch", "acvl_utils"]
    assert asked == ["torch", "nnunetv2", "dynamic_network_architectures", "acvl_utils", "SimpleITK", "scipy"]


def test_this_venv_has_everything():
    assert deps.missing_packages() == []
    assert deps.status_message() is None
    assert deps.self_test_skip_reason() is None
    assert deps.plan_install().empty


def test_status_message_exact_when_torch_and_nnunet_are_missing():
    env = FakeEnv({"numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.5.2"},
                  missing=["torch"] + NNUNET_MODULES)
    assert deps.status_message(env.find_spec, env.version, env.requires) == (
        "LesionLocator needs Python packages that are not installed: torch, nnunetv2, "
        "dynamic_network_architectures, acvl_utils.\n"
        "torch comes from the PyTorch extension (Extensions Manager; restart Slicer after installing it), which "
        "picks the build for your GPU or CPU: 'Install dependencies' asks it for torch>=2.1.2,!=2.9.*.\n"
        "'Install dependencies' installs nnunetv2>=2.8 with pip, keeping the installed versions of torch, "
        "torchvision, SimpleITK, numpy and scipy as they are.")


def test_outdated_nnunet_is_upgraded_with_the_pins():
    env = FakeEnv(dict(SLICER_510, nnunetv2="2.5.1"), requires=NNUNET_281_REQUIRES)
    assert deps.outdated_packages(env.version) == ["nnunetv2"]
    assert deps.status_message(**env.checks()) == (
        "nnunetv2 2.5.1 is installed, but LesionLocator needs nnunetv2>=2.8: 'Install dependencies' upgrades "
        "it (then restart Slicer).")
    plan = deps.plan_install(**env.checks())
    assert (plan.problem, plan.torch, plan.pip) == (None, None, ["nnunetv2>=2.8"])


# -------------------------------------------------------------------------- torch requirement
def test_torch_requirement_from_the_installed_nnunetv2_metadata():
    """The real metadata of the nnunetv2 in the project's venv; the fallback constant is
    what nnunetv2 2.8.1 says (re-verify it when nnunetv2 changes)."""
    assert importlib.metadata.version("nnunetv2") == "2.8.1"
    assert importlib.metadata.requires("nnunetv2") == NNUNET_281_REQUIRES
    assert deps.nnunet_torch_specifier() == "!=2.9.*,>=2.1.2"
    assert deps.nnunet_torch_specifier() == deps.NNUNET_TORCH_SPECIFIER_FALLBACK
    assert deps.torch_requirement() == ">=2.1.2,!=2.9.*"


def test_torch_requirement_without_nnunetv2_and_with_other_metadata():
    def absent(name):
        raise importlib.metadata.PackageNotFoundError(name)

    assert deps.torch_requirement(absent) == ">=2.1.2,!=2.9.*"           # the verified 2.8.1 constant
    assert deps.torch_requirement(lambda name: None) == ">=2.1.2,!=2.9.*"
    newer = ["torch>=2.4,!=2.9.*,!=2.10.0", 'torch<2.3; extra == "intel-macos"', "numpy"]
    assert deps.nnunet_torch_specifier(lambda name: newer) == "!=2.10.0,!=2.9.*,>=2.4"
    assert deps.torch_requirement(lambda name: newer) == ">=2.4,!=2.10.0,!=2.9.*"
    assert deps.torch_requirement(lambda name: ["numpy"]) == ">=2.1"      # nnunetv2 without a torch bound


def test_combine_specifiers_keeps_the_tightest_bounds():
    assert deps.combine_specifiers(">=2.1", "!=2.9.*,>=2.1.2") == ">=2.1.2,!=2.9.*"
    assert deps.combine_specifiers(">=2.1", "<3", "<2.12,>=2.0") == ">=2.1,<2.12"
    assert deps.combine_specifiers("", "==2.5.1") == "==2.5.1"


def test_torch_version_problems():
    def requires(name):
        return NNUNET_281_REQUIRES

    assert deps.version_problems(FakeEnv(SLICER_510).version, requires) == []
    # a source build reports a pre-release with a local label: it is a torch 2.10
    assert deps.version_problems(FakeEnv({"torch": "2.10.0a0+git1234abc"}).version, requires) == []
    assert deps.version_problems(FakeEnv({"torch": "2.9.1+cu128"}).version, requires) == [(
        "torch 2.9.1+cu128 is installed, but LesionLocator and nnunetv2 need torch>=2.1.2,!=2.9.*. LesionLocator "
        "does not replace torch (the PyTorch extension chose its build for this computer): in the PyTorch Utils "
        "module press 'Uninstall', restart Slicer, then press 'Install dependencies' here, which installs "
        "torch>=2.1.2,!=2.9.* through the PyTorch extension.")]
    assert deps.version_problems(FakeEnv({"SimpleITK": "2.1.1"}).version, requires) == [(
        "SimpleITK 2.1.1 is installed, but LesionLocator needs SimpleITK>=2.2; it is part of 3D Slicer and is not "
        "replaced here: use 3D Slicer 5.10 or newer.")]


# --------------------------------------------------------------------------------------- plan
def test_plan_pins_every_installed_protected_package_with_its_local_label():
    env = FakeEnv(SLICER_510, missing=NNUNET_MODULES, requires=None)
    plan = deps.plan_install(**env.checks())
    assert plan.problem is None and plan.torch is None
    assert plan.pip == ["nnunetv2>=2.8"]
    assert plan.constraints == SLICER_510_PINS.splitlines()
    assert deps.pip_arguments(plan.pip, "/tmp/c/constraints.txt") == ["nnunetv2>=2.8", "-c", "/tmp/c/constraints.txt"]
    assert plan.describe() == (
        "LesionLocator will install:\n"
        "nnunetv2>=2.8 with pip; kept as installed: torch==2.5.1+cu121, torchvision==0.20.1+cu121, "
        "SimpleITK==2.5.2, numpy==2.0.2, scipy==1.13.1.\n"
        "This downloads several hundred MB.")


def test_plan_never_lets_pip_install_torch():
    env = FakeEnv({}, missing=[p.module for p in deps.PACKAGES])
    plan = deps.plan_install(**env.checks())
    assert plan.torch == ">=2.1.2,!=2.9.*"
    assert plan.pip == ["nnunetv2>=2.8", "SimpleITK>=2.2", "scipy"]
    assert not any(r.split("<")[0].split(">")[0].split("=")[0].strip().lower() in ("torch", "torchvision")
                   for r in plan.pip)
    assert plan.constraints == []


# ------------------------------------------------------------------------------------ install
def test_install_runs_the_exact_pip_command_and_deletes_the_constraints_file():
    env = FakeEnv(SLICER_510, missing=NNUNET_MODULES)
    reports = []
    result = deps.install(env.pip_install, env.install_torch, reports.append, **env.checks())
    assert (result.ok, result.restart) == (True, False)
    assert result.message == "Installed nnunetv2>=2.8."
    [(kind, args, pins, path)] = env.calls
    assert kind == "pip"
    assert args == ["nnunetv2>=2.8", "-c", path]
    assert os.path.basename(path) == "constraints.txt"
    assert pins == SLICER_510_PINS
    assert not os.path.exists(path)
    assert reports == [
        ("Installing nnunetv2>=2.8 with pip, keeping torch==2.5.1+cu121, torchvision==0.20.1+cu121, "
         "SimpleITK==2.5.2, numpy==2.0.2, scipy==1.13.1 as installed (this can take several minutes)..."),
        "Installed nnunetv2>=2.8."]


def test_install_asks_the_pytorch_extension_first_then_pins_the_new_torch():
    env = FakeEnv({"numpy": "2.0.2", "scipy": "1.13.1", "SimpleITK": "2.5.2"},
                  missing=["torch"] + NNUNET_MODULES)
    result = deps.install(env.pip_install, env.install_torch, lambda text: None, **env.checks())
    assert result.ok, result.message
    assert result.message == "Installed torch 2.13.0+cu130, nnunetv2>=2.8."
    assert env.calls[0] == ("torch", ">=2.1.2,!=2.9.*")
    assert env.calls[1][0] == "pip" and env.calls[1][1][0] == "nnunetv2>=2.8"
    assert env.calls[1][2] == ("torch==2.13.0+cu130\ntorchvision==0.28.0+cu130\nSimpleITK==2.5.2\nnumpy==2.0.2\n"
                               "scipy==1.13.1\n")


def test_install_without_the_pytorch_extension_says_so_and_runs_no_pip():
    env = FakeEnv({}, missing=["torch"] + NNUNET_MODULES)
    result = deps.install(env.pip_install, None, lambda text: None, **env.checks())
    assert not result.ok and env.calls == []
    assert result.message == ("torch is not installed: install the PyTorch extension (Extensions Manager), restart "
                              "Slicer, then install torch>=2.1.2,!=2.9.* with it (PyTorch Utils module).")


def test_install_torch_declined_or_failing():
    env = FakeEnv({}, missing=["torch"])
    declined = deps.install(env.pip_install, lambda requirement: None, lambda text: None, **env.checks())
    assert (declined.ok, declined.message) == (False, "Installing torch was cancelled: nothing was changed.")

    def ltt_fails(requirement):
        print("Collecting torch")
        print("ERROR: No matching distribution found for torch>=2.1.2,!=2.9.*")
        raise subprocess.CalledProcessError(
            1, ["PythonSlicer", "-m", "light_the_torch", "install", "torch" + requirement, "torchvision"],
            output=io.StringIO())  # what Slicer's logProcessOutput attaches: a spent pipe

    failed = deps.install(env.pip_install, ltt_fails, lambda text: None, **env.checks())
    assert not failed.ok and env.calls == []
    assert failed.message == (
        "Installing torch>=2.1.2,!=2.9.* with the PyTorch extension failed (exit status 1).\n"
        "Command: PythonSlicer -m light_the_torch install torch>=2.1.2,!=2.9.* torchvision\n"
        "Last lines of its output:\n"
        "  Collecting torch\n"
        "  ERROR: No matching distribution found for torch>=2.1.2,!=2.9.*\n"
        "If the PyTorch extension is missing: install it from the Extensions Manager and restart Slicer.")


def test_pip_failure_names_the_command_and_the_output_tail():
    env = FakeEnv(SLICER_510, missing=NNUNET_MODULES)
    output = "\n".join([f"line {i}" for i in range(1, 21)] + [
        "ERROR: Cannot install nnunetv2==2.8.1 because these package versions have conflicting dependencies.",
        "ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/"])

    def pip_install(args):
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *args], output=output)

    reports = []
    result = deps.install(pip_install, env.install_torch, reports.append, **env.checks())
    assert (result.ok, result.restart) == (False, False)
    assert result.message == "\n".join([
        "Installing LesionLocator's Python packages failed (exit status 1).",
        "Command: pip install 'nnunetv2>=2.8' -c constraints.txt",
        "Last lines of its output:",
        *[f"  line {i}" for i in range(11, 21)],
        "  ERROR: Cannot install nnunetv2==2.8.1 because these package versions have conflicting dependencies.",
        "  ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/",
        ("pip found no versions that work with the installed torch==2.5.1+cu121, torchvision==0.20.1+cu121, "
         "SimpleITK==2.5.2, numpy==2.0.2, scipy==1.13.1 (kept as installed on purpose, nothing of them was "
         "changed).")])
    assert reports[-1] == result.message


def test_pip_failure_the_slicer_way_quotes_what_pip_printed():
    """slicer.util.pip_install prints pip's lines and raises CalledProcessError whose output
    is the spent pipe (Slicer 5.8-5.12), or no output at all (5.12's dialog)."""
    env = FakeEnv(SLICER_510, missing=NNUNET_MODULES)

    def pip_install(args):
        print("Collecting nnunetv2>=2.8")
        print("ERROR: Could not find a version that satisfies the requirement nnunetv2>=2.8")
        raise subprocess.CalledProcessError(1, "pip install")

    result = deps.install(pip_install, None, lambda text: None, **env.checks())
    assert result.message == (
        "Installing LesionLocator's Python packages failed (exit status 1).\n"
        "Command: pip install 'nnunetv2>=2.8' -c constraints.txt\n"
        "Last lines of its output:\n"
        "  Collecting nnunetv2>=2.8\n"
        "  ERROR: Could not find a version that satisfies the requirement nnunetv2>=2.8\n"
        "constraints.txt: torch==2.5.1+cu121, torchvision==0.20.1+cu121, SimpleITK==2.5.2, numpy==2.0.2, "
        "scipy==1.13.1")


@pytest.mark.parametrize("error", [RuntimeError("PythonSlicer executable not found"), SystemExit(2)])
def test_any_other_failure_is_a_message_too(error):
    env = FakeEnv(SLICER_510, missing=NNUNET_MODULES)

    def pip_install(args):
        raise error

    def report(text):
        raise ValueError("the status label is gone")  # not even this escapes

    result = deps.install(pip_install, None, report, **env.checks())
    assert not result.ok
    assert result.message == (
        f"Installing LesionLocator's Python packages failed: {type(error).__name__}: {error}\n"
        "Command: pip install 'nnunetv2>=2.8' -c constraints.txt\n"
        "constraints.txt: torch==2.5.1+cu121, torchvision==0.20.1+cu121, SimpleITK==2.5.2, numpy==2.0.2, "
        "scipy==1.13.1")


def test_install_refuses_an_incompatible_torch_and_an_old_python():
    env = FakeEnv(dict(SLICER_510, torch="2.9.0+cu128"), missing=NNUNET_MODULES, requires=NNUNET_281_REQUIRES)
    result = deps.install(env.pip_install, env.install_torch, lambda text: None, **env.checks())
    assert not result.ok and env.calls == []
    assert result.message.startswith("torch 2.9.0+cu128 is installed, but LesionLocator and nnunetv2 need "
                                     "torch>=2.1.2,!=2.9.*.")
    old = deps.install(env.pip_install, env.install_torch, lambda text: None,
                       **env.checks(version_info=(3, 9, 10)))
    assert not old.ok and env.calls == []
    assert old.message == deps.unsupported_python_message((3, 9, 10))


def test_install_notices_torch_changing_under_pip():
    env = FakeEnv(SLICER_510, missing=NNUNET_MODULES)

    def pip_install(args):
        env.pip_install(args)
        env.versions["torch"] = "2.15.0"

    result = deps.install(pip_install, None, lambda text: None, **env.checks())
    assert (result.ok, result.restart) == (False, True)
    assert result.message == ("pip changed torch from 2.5.1+cu121 to 2.15.0 although it was pinned (command: pip "
                              "install 'nnunetv2>=2.8' -c constraints.txt); check torch in the PyTorch Utils module.")


def test_upgrading_an_imported_nnunet_asks_for_a_restart(monkeypatch):
    env = FakeEnv(dict(SLICER_510, nnunetv2="2.5.1"))
    monkeypatch.setitem(sys.modules, "nnunetv2", types.ModuleType("nnunetv2"))
    result = deps.install(env.pip_install, None, lambda text: None, **env.checks())
    assert (result.ok, result.restart) == (True, True)
    assert result.message == "Installed nnunetv2>=2.8. Restart 3D Slicer before using LesionLocator."


def test_nothing_to_do():
    env = FakeEnv(SLICER_510)
    result = deps.install(env.pip_install, env.install_torch, lambda text: None, **env.checks())
    assert (result.ok, result.message, env.calls) == (True, "All of LesionLocator's Python packages are installed.",
                                                      [])


# ------------------------------------------------------------------------------- Slicer glue
def test_install_in_slicer_passes_the_requirement_to_pytorch_utils(monkeypatch):
    """Fake ``slicer.util`` and ``PyTorchUtils`` with the real signatures: pip_install(requirements)
    and installTorch(askConfirmation=False, forceComputationBackend=None,
    torchVersionRequirement=None, torchvisionVersionRequirement=None)."""
    env = FakeEnv({"numpy": "2.0.2"}, missing=["torch"] + NNUNET_MODULES)
    asked = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            asked.append((askConfirmation, forceComputationBackend, torchVersionRequirement,
                          torchvisionVersionRequirement))
            return env.install_torch(torchVersionRequirement)

    slicer = types.ModuleType("slicer")
    slicer.util = types.ModuleType("slicer.util")
    slicer.util.pip_install = env.pip_install
    pytorch_utils = types.ModuleType("PyTorchUtils")
    pytorch_utils.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setitem(sys.modules, "slicer.util", slicer.util)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorch_utils)
    reports = []
    assert deps.install_in_slicer(reports.append, **env.checks()) is None
    assert reports[-1] == "Installed torch 2.13.0+cu130, nnunetv2>=2.8."
    assert asked == [(True, None, ">=2.1.2,!=2.9.*", None)]
    assert [call[0] for call in env.calls] == ["torch", "pip"]


def test_install_in_slicer_outside_slicer(monkeypatch):
    monkeypatch.setitem(sys.modules, "slicer", None)  # import fails
    message = deps.install_in_slicer(lambda text: None)
    assert message.startswith("3D Slicer's Python is needed to install LesionLocator's packages: "
                              "ModuleNotFoundError: ")  # then Python's own words


def test_install_in_slicer_without_the_pytorch_extension(monkeypatch):
    env = FakeEnv({}, missing=["torch"])
    slicer = types.ModuleType("slicer")
    slicer.util = types.ModuleType("slicer.util")
    slicer.util.pip_install = env.pip_install
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setitem(sys.modules, "slicer.util", slicer.util)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # import fails
    message = deps.install_in_slicer(lambda text: None, **env.checks())
    assert message.splitlines()[0] == (
        "Installing torch>=2.1.2,!=2.9.* with the PyTorch extension failed: RuntimeError: the PyTorch extension is "
        "not installed (Extensions Manager: PyTorch; restart Slicer after installing it)")


# ---------------------------------------------------------------------------------- self-test
def test_self_test_skip_reason_when_torch_is_missing(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "torch" else real(name, *a))
    reason = deps.self_test_skip_reason()
    monkeypatch.undo()
    assert reason == ("LesionLocator self-test skipped: torch is not installed (missing: torch); the self-test runs "
                      "the network. Install them with the LesionLocator module's 'Install dependencies' button.")


# ------------------------------------------------------------------- real pip, offline-safe
# what pip says when it cannot reach an index: with --retries 0 a refused connection only
# shows as a package with no versions at all
OFFLINE_SIGNS = ("NewConnectionError", "Could not fetch URL", "Failed to establish",
                 "Temporary failure in name resolution", "Network is unreachable", "ConnectTimeout", "ReadTimeout",
                 "ProxyError",
                 "(from versions: none)")


def test_real_pip_with_the_pins_replaces_nothing(tmp_path):
    """pip itself (dry run) with this venv's pins and every requirement the plan can ask
    for: it may only add distributions that are not installed, never replace one (torch
    least of all). Skipped when pip needs the package index and cannot reach it."""
    pins = deps.constraint_lines()
    assert pins[0] == "torch==" + importlib.metadata.version("torch")
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(pin + "\n" for pin in pins), encoding="utf-8")
    everything = deps.pip_requirements(p.module for p in deps.PACKAGES)
    assert everything == ["nnunetv2>=2.8", "SimpleITK>=2.2", "scipy"]
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--report", str(report), "--retries", "0",
               "--timeout", "15", *deps.pip_arguments(everything, str(constraints))]
    try:
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        pytest.skip("pip --dry-run took more than 180 s (slow or unreachable package index)")
    output = result.stdout + result.stderr
    if result.returncode != 0 and any(sign in output for sign in OFFLINE_SIGNS):
        pytest.skip("the package index is unreachable (pip: " + output.strip().splitlines()[-1] + ")")
    assert result.returncode == 0, output
    would_install = {item["metadata"]["name"]: item["metadata"]["version"]
                     for item in json.loads(report.read_text(encoding="utf-8"))["install"]}
    assert "torch" not in would_install
    replaced = []
    for name, new in would_install.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # only added
        if installed != new:  # pip never counts an installed 'argparse' (stdlib name): same version again is fine
            replaced.append(f"{name} {installed} -> {new}")
    assert replaced == []
