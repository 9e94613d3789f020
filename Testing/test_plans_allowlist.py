"""A model folder is data, never code: plans.json is checked against an allow-list before anything
is imported, in the library, the CLI, the worker process and the zoo's install check."""
import copy
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from LesionLocatorLib.model import CheckpointError, ModelLayoutError, PlansError, build_network, check_model_root, \
    load_model
from LesionLocatorLib.plans import check_plans, resolve_configuration
from LesionLocatorLib.plans import DATASET_JSON, make_plans
from phantoms import ct_phantom

REPO = Path(__file__).resolve().parents[1]
HUBCONF = """
from pathlib import Path
Path(__file__).with_name("MARKER").write_text("hub code ran")


def evil(**kwargs):
    import torch
    return torch.nn.Conv3d(2, 2, 1)
"""


def _plans_file(root: Path, sub: str = "LesionLocatorSeg/point_optimized") -> Path:
    return root / sub / "plans.json"


def _poison(root: Path, mutate) -> dict:
    """Rewrite the point model's plans.json with ``mutate(configuration)`` applied."""
    plans = json.loads(_plans_file(root).read_text())
    mutate(plans["configurations"]["3d_fullres"])
    _plans_file(root).write_text(json.dumps(plans))
    return plans


def _hub_attack(config: dict, folder: Path) -> None:
    """What the audit did: nnU-Net resolves network_class_name by name, so torch.hub.load runs the
    hubconf.py beside plans.json (source 'local'), and that file writes MARKER."""
    config["architecture"] = {"network_class_name": "torch.hub.load",
                              "arch_kwargs": {"repo_or_dir": str(folder), "model": "evil", "source": "local",
                                              "trust_repo": True},
                              "_kw_requires_import": []}


@pytest.fixture()
def attacked_root(tiny_model_root, tmp_path):
    root = shutil.copytree(tiny_model_root, tmp_path / "evil" / "LesionLocatorCheckpoint")
    folder = _plans_file(root).parent
    (folder / "hubconf.py").write_text(HUBCONF)
    _poison(root, lambda c: _hub_attack(c, folder))
    return root, folder / "MARKER"


def test_the_hub_attack_is_real_under_nnunets_own_loader(attacked_root):
    """Positive control: the poisoned plans really run code through nnU-Net's get_network_from_plans,
    so the refusals below test the real attack."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    root, marker = attacked_root
    arch = json.loads(_plans_file(root).read_text())["configurations"]["3d_fullres"]["architecture"]
    get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"], 2, 2,
                           allow_init=False)
    assert marker.read_text() == "hub code ran"


def test_the_hub_attack_is_refused_by_the_library_with_the_key_named(attacked_root):
    root, marker = attacked_root
    for call in (lambda: load_model(root, "point", device="cpu"), lambda: check_model_root(root)):
        with pytest.raises(PlansError, match=r"architecture\.network_class_name 'torch\.hub\.load' is not an "
                                             r"allowed network .*a model folder may not name code"):
            call()
    assert not marker.exists()
    # the box model of the same root is untouched and still loads
    assert load_model(root, "box", device="cpu").folder.name == "bbox_optimized"


def test_the_hub_attack_is_refused_by_the_cli_without_a_traceback(attacked_root, tmp_path):
    root, marker = attacked_root
    img, _ = ct_phantom(shape_zyx=(20, 40, 40), lesions=[((10, 20, 20), 5.0, 100)])
    from LesionLocatorLib.image import write_image
    write_image(img, tmp_path / "ct.nii.gz")
    (tmp_path / "p.json").write_text(json.dumps({"1": {"point": [10, 20, 20]}}))
    proc = subprocess.run([sys.executable, "-m", "LesionLocatorLib.cli", "segment", "-i", str(tmp_path / "ct.nii.gz"),
                           "-p", str(tmp_path / "p.json"), "-t", "point", "-o", str(tmp_path / "out"), "-m",
                           str(root), "--device", "cpu", "--disable_progress_bar"],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "network_class_name 'torch.hub.load' is not an allowed network" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()
    assert not list(tmp_path.glob("out/*"))


def test_the_hub_attack_is_refused_by_the_worker_which_keeps_serving(attacked_root, tiny_model_root):
    root, marker = attacked_root
    proc = subprocess.Popen([sys.executable, "-m", "LesionLocatorLib.worker"], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
    try:
        def ask(message: dict, answer: str) -> dict:
            proc.stdin.write(json.dumps(message) + "\n")
            proc.stdin.flush()
            while True:
                reply = json.loads(proc.stdout.readline())
                if reply["type"] == answer or reply["type"] == "error":
                    return reply

        ask({"type": "hello", "protocol": "lesionlocator-runner/1"}, "ready")
        bad = ask({"type": "load", "id": "a", "model": {"path": str(root), "device": "cpu"},
                   "prompt_types": ["point"]}, "loaded")
        assert bad["type"] == "error" and bad["id"] == "a" and bad["error"] == "PlansError"
        assert "network_class_name 'torch.hub.load' is not an allowed network" in bad["message"]
        good = ask({"type": "load", "id": "b", "model": {"path": str(tiny_model_root), "device": "cpu"},
                    "prompt_types": ["point"]}, "loaded")
        assert good == {"type": "loaded", "id": "b", "loads": 1}
    finally:
        proc.stdin.write(json.dumps({"type": "shutdown"}) + "\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    assert not marker.exists()


def test_the_slicer_modules_worker_runner_re_raises_the_refusal(attacked_root):
    """The Slicer module's path (WorkerProcessRunner): the worker's refusal comes back as the same
    PlansError with the same message, and no hub code ran."""
    from LesionLocatorLib.prompts import Point
    from LesionLocatorLib.runner import ModelSpec, SegmentationRequest, WorkerProcessRunner

    root, marker = attacked_root
    img, _ = ct_phantom(shape_zyx=(20, 40, 40), lesions=[((10, 20, 20), 5.0, 100)])
    runner = WorkerProcessRunner()
    try:
        with pytest.raises(PlansError, match=r"network_class_name 'torch\.hub\.load' is not an allowed network"):
            runner.run(SegmentationRequest(img, [Point(1, tuple(img.index_to_world((10, 20, 20))))],
                                           ModelSpec(str(root), device="cpu")))
    finally:
        runner.close()
    assert not marker.exists()


def test_the_zoo_refuses_to_install_an_archive_with_poisoned_plans(attacked_root, tmp_path):
    from LesionLocatorLib import zoo

    root, marker = attacked_root
    archive = tmp_path / "LesionLocatorCheckpoint.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for f in root.rglob("*"):
            if f.is_file():
                z.write(f, f.relative_to(root.parent).as_posix())
    with pytest.raises(ModelLayoutError, match=r"does not unpack to a complete LesionLocator model: .*"
                                               r"'torch\.hub\.load' is not an allowed network"):
        zoo.install_from_archive(archive, "evil", cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert not (tmp_path / "cache" / "models" / "evil").exists()


# every way a plans.json could name code or smuggle a value, and the key the refusal must name
def _arch(c):
    return c["architecture"]


def _kw(c):
    return c["architecture"]["arch_kwargs"]


BAD_PLANS = [
    ("class os.system", lambda c: _arch(c).update(network_class_name="os.system"),
     r"network_class_name 'os\.system' is not an allowed network"),
    ("class by short name", lambda c: _arch(c).update(network_class_name="ResidualEncoderUNet"),
     r"network_class_name 'ResidualEncoderUNet' is not an allowed network"),
    ("conv_op os.system", lambda c: _kw(c).update(conv_op="os.system"),
     r"arch_kwargs\.conv_op 'os\.system' is not an allowed op"),
    ("nonlin eval", lambda c: _kw(c).update(nonlin="builtins.eval"),
     r"arch_kwargs\.nonlin 'builtins\.eval' is not an allowed op"),
    ("norm_op a conv", lambda c: _kw(c).update(norm_op="torch.nn.Conv3d"),
     r"arch_kwargs\.norm_op 'torch\.nn\.Conv3d' is not an allowed op"),
    ("dropout_op a torch function", lambda c: _kw(c).update(dropout_op="torch.hub.load"),
     r"arch_kwargs\.dropout_op 'torch\.hub\.load' is not an allowed op"),
    ("block subprocess", lambda c: _kw(c).update(block="subprocess.Popen"),
     r"arch_kwargs\.block 'subprocess\.Popen' is not an allowed block"),
    ("import of a data key", lambda c: _arch(c).update(_kw_requires_import=["conv_op", "n_stages"]),
     r"_kw_requires_import names 'n_stages', which may not be imported"),
    ("unknown keyword", lambda c: _kw(c).update(repo_or_dir="/tmp"),
     r"arch_kwargs\.repo_or_dir is not an allowed keyword of ResidualEncoderUNet"),
    ("op keyword that picks a device", lambda c: _kw(c)["norm_op_kwargs"].update(device="cuda"),
     r"arch_kwargs\.norm_op_kwargs\.device is not an allowed keyword"),
    ("string where a number goes", lambda c: _kw(c).update(n_stages="3"),
     r"arch_kwargs\.n_stages = '3' is not a valid value \(int\)"),
    ("absurd width", lambda c: _kw(c).update(features_per_stage=[4, 8, 10 ** 9]),
     r"arch_kwargs\.features_per_stage = \[4, 8, 1000000000\] is not a valid value"),
    ("nested kernel sizes", lambda c: _kw(c).update(kernel_sizes=[[[3, 3, 3]]] * 3),
     r"arch_kwargs\.kernel_sizes = .* is not a valid value \(sizes\)"),
    ("missing keyword", lambda c: _kw(c).pop("strides"), r"arch_kwargs\.strides is missing"),
    ("extra architecture key", lambda c: _arch(c).update(loader="pickle"),
     r"architecture\.loader is not an allowed key"),
    ("old format, unknown class", lambda c: (c.pop("architecture"), c.update(UNet_class_name="os.system")),
     r"UNet_class_name 'os\.system' is not allowed"),
    ("no spacing", lambda c: c.pop("spacing"), r"spacing must be 3 positive numbers in mm .* got None"),
    ("NaN spacing", lambda c: c.update(spacing=[1.0, float("nan"), 0.8]), r"spacing must be 3 positive numbers"),
    ("2-value patch", lambda c: c.update(patch_size=[32, 48]),
     r"spacing must be 2 positive numbers"),
]


@pytest.mark.parametrize("name,mutate,message", BAD_PLANS, ids=[b[0] for b in BAD_PLANS])
def test_each_name_or_value_outside_the_allow_list_is_refused_by_key(name, mutate, message, tiny_model_root,
                                                                     tmp_path):
    root = shutil.copytree(tiny_model_root, tmp_path / "LesionLocatorCheckpoint")
    _poison(root, mutate)
    with pytest.raises(PlansError, match=message):
        check_model_root(root)
    with pytest.raises(PlansError, match=message):
        load_model(root, "point", device="cpu")


def test_an_unused_configuration_is_checked_too_and_inheritance_is_resolved():
    plans = make_plans((4, 8, 16), (1, 1, 1), (32, 48, 48))
    plans["configurations"]["3d_lowres"] = {"inherits_from": "3d_fullres", "spacing": [2.0, 1.6, 1.6]}
    check_plans(plans)
    low = resolve_configuration(plans, "3d_lowres")
    assert low["spacing"] == [2.0, 1.6, 1.6] and low["patch_size"] == [32, 48, 48] and "inherits_from" not in low
    bad = copy.deepcopy(plans)
    bad["configurations"]["3d_lowres"]["architecture"] = {"network_class_name": "torch.hub.load"}
    with pytest.raises(PlansError, match=r"\(3d_lowres\): architecture\.network_class_name 'torch\.hub\.load'"):
        check_plans(bad)
    loop = copy.deepcopy(plans)
    loop["configurations"]["3d_fullres"]["inherits_from"] = "3d_lowres"
    with pytest.raises(PlansError, match="inherits from itself"):
        check_plans(loop)


def test_the_allow_list_builds_exactly_the_network_nnunet_builds():
    """Official-style plans: same class, same tensors (the same random numbers drawn) as nnU-Net's own
    get_network_from_plans; nnU-Net's old plans format too."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    plans = make_plans((4, 8, 16), (1, 2, 1), (32, 48, 48))
    arch = plans["configurations"]["3d_fullres"]["architecture"]
    torch.manual_seed(5)
    ours = build_network(plans, "3d_fullres", DATASET_JSON, deep_supervision=True)
    torch.manual_seed(5)
    theirs = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                    2, 2, allow_init=True, deep_supervision=True)
    assert type(ours) is type(theirs)
    a, b = ours.state_dict(), theirs.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)

    old = copy.deepcopy(plans)
    c = old["configurations"]["3d_fullres"]
    del c["architecture"]
    c.update(UNet_class_name="PlainConvUNet", UNet_base_num_features=4, unet_max_num_features=16,
             n_conv_per_stage_encoder=[2, 2, 2], n_conv_per_stage_decoder=[2, 2],
             conv_kernel_sizes=[[3, 3, 3]] * 3, pool_op_kernel_sizes=[[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    net = build_network(old, "3d_fullres", DATASET_JSON)
    assert type(net).__name__ == "PlainConvUNet"
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv3d)][:2] == [4, 4]


def test_plans_that_describe_another_network_fail_before_allocation(tiny_model_root, tmp_path):
    """A checkpoint with plans for a huge network: refused from the meta-device shapes, nothing allocated."""
    root = shutil.copytree(tiny_model_root, tmp_path / "LesionLocatorCheckpoint")
    _poison(root, lambda c: _kw(c).update(features_per_stage=[4000, 4000, 4000]))
    with pytest.raises(CheckpointError, match=r"the weights do not fit the architecture in plans\.json: "
                                              r"encoder\.stem\.convs\.0\.conv\.weight: checkpoint \(4, 2, 3, 3, 3\), "
                                              r"plans \(4000, 2, 3, 3, 3\)"):
        load_model(root, "point", device="cpu")


def test_loaded_network_equals_nnunets_network_with_the_checkpoint_loaded(tiny_model_root):
    """Materialised from the meta device and filled with the checkpoint: the same tensors as nnU-Net's
    get_network_from_plans + load_state_dict (aliased keys such as decoder.encoder.* included)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    from LesionLocatorLib.model import _network_state, load_checkpoint

    model = load_model(tiny_model_root, "point", device="cpu")
    ckpt = _network_state(load_checkpoint(model.folder / "fold_0" / "checkpoint_final.pth")["network_weights"])
    arch = model.plans["configurations"]["3d_fullres"]["architecture"]
    reference = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"], arch["_kw_requires_import"],
                                       2, 2, allow_init=True, deep_supervision=False)
    reference.load_state_dict(ckpt)
    state, ref = model.network.state_dict(), reference.state_dict()
    assert set(state) == set(ref) == set(ckpt) and all(torch.equal(state[k], ref[k]) for k in state)
    assert not any(p.is_meta for p in model.network.parameters())
    x = torch.randn(1, 2, 32, 48, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model.forward(x), reference.eval()(x))
