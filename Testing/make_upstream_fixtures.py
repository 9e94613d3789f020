"""Record upstream LesionLocator's segmentation output as test fixtures.

``Testing/test_upstream_equivalence.py`` compares our library with what the
upstream code (MIC-DKFZ/LesionLocator, GPL-3.0) computes on the same input. The
upstream code is **never** part of this repository: it is installed from its
public source into a separate virtual environment, and this script *calls* it
(in a subprocess running that environment's Python). Only its outputs (logits,
masks) are committed, under ``Testing/fixtures/upstream/``.

Setting up the upstream environment (once, outside this repository)
------------------------------------------------------------------
::

    # 1. the upstream source, any checkout outside this repo (we used commit
    #    225b4194e9d3fec71ab0f9660591772568242124 of github.com/MIC-DKFZ/LesionLocator)
    git clone https://github.com/MIC-DKFZ/LesionLocator /work/upstream_src
    # 2. its own virtual environment, with a CPU torch (never let pip pick a CUDA build:
    #    always pass this repository's constraints file)
    python3 -m venv /work/upstream_venv
    /work/upstream_venv/bin/pip install torch==2.13.0 -c constraints.txt
    /work/upstream_venv/bin/pip install -c constraints.txt /work/upstream_src
    # upstream pins dynamic-network-architectures<0.4, so this environment gets 0.3.1
    # (ours has 0.4.4 through nnunetv2 2.8). If a dependency of the tracking part
    # (unigradicon, icon_registration, ...) fails to install, install upstream with
    # --no-deps plus what its segmentation imports: acvl-utils<0.3,
    # dynamic-network-architectures<0.4, batchgenerators, scikit-image, SimpleITK,
    # connected-components-3d, tqdm, scipy, pandas, nibabel, einops, blosc2,
    # batchgeneratorsv2 (all with -c constraints.txt).

Regenerating the fixtures
-------------------------
Run with *our* environment (it builds the inputs with LesionLocatorLib)::

    python Testing/make_upstream_fixtures.py --upstream-python /work/upstream_venv/bin/python

Stage 1 (our environment) writes into a work folder: the tiny random-weight
checkpoint (``build_test_models.build_tiny_checkpoint``, deterministic seed, in the
official layout upstream loads), the phantom CT images and the prompt JSONs in
upstream's format (voxel indices z, y, x; boxes half-open). Stage 2 runs this same
file with the upstream Python (``--stage upstream``): it imports
``lesionlocator.inference.lesionlocator_segment.LesionLocatorSegmenter`` and calls
upstream's own steps in-process, exactly as ``LesionLocator_segment -device cpu
-f 0 --disable_tta`` chains them, minus the worker processes:
``initialize_from_trained_model_folder`` -> ``DefaultPreprocessor.run_case`` ->
``get_prompt_from_json`` -> ``sparse_to_dense_prompt`` ->
``predict_logits_from_preprocessed_data`` (logits in the preprocessed grid, NaN
where no patch was predicted) -> ``export_prediction_from_logits`` (the
``<case>_lesion_<id>.nii.gz`` mask). The logits on the original grid are upstream's
``resampling_fn_probabilities`` applied to the same logits (the first step of its
export).

Variants recorded per prompt (device cpu, use_mirroring False, folds (0,)):

* ``release``: upstream unchanged. It accumulates the sliding-window logits and the
  Gaussian weights in fp16 (``dtype=torch.half`` in
  ``_internal_predict_sliding_window_return_logits``; ``compute_gaussian``'s default
  ``dtype=torch.float16``), on every device.
* ``fp32``: the same code with that accumulation in fp32, patched at run time by this
  script (see :func:`_fp32_accumulation`): the module global ``torch`` of
  ``lesionlocator.inference.lesionlocator_segment`` is replaced by a proxy that
  forwards everything to torch except ``half``, which is ``torch.float32`` (``torch.half``
  occurs in that module only in the two ``torch.zeros`` of the accumulators), and the
  module's ``compute_gaussian`` is wrapped to pass ``dtype=torch.float32``.
* ``fp32_fixedpoint`` (``padded`` case, points): fp32 as above, and upstream's
  ``get_centroids_from_json`` (which subtracts the nonzero-crop offset twice for
  points) replaced by the fixed formula ``round(clip(p - crop_lo, 0, cropped_shape) *
  model_shape / cropped_shape)`` (numpy round-half-to-even, as upstream rounds).
* ``fp32_fixedbox`` (``edgebox`` case): fp32, and upstream's ``get_bboxes_from_json``
  replaced by the same mapping without its uint16 underflow: upstream computes
  ``max(0, zmin - 1)`` on a ``np.uint16``, so a box whose low edge maps to
  preprocessed voxel 0 gets 65535 and the lesion is skipped ("Invalid bbox found!").

Our output must match the fp32 run (the fixed variant where one exists); the
``release`` run is kept to show what the fp16 accumulation and the bugs change.
Unless ``--no-cli-check`` is given, stage 2 also runs upstream's real command
``LesionLocator_segment -device cpu -f 0 --disable_tta`` on every case and checks
that its masks equal the in-process ``release`` run (it did: 0 voxels differ).

Fixtures written (about 2.7 MB): ``<case>.nii.gz`` (input images; ``padded``,
``torchres`` and ``edgebox`` are built from ``aniso.nii.gz``, see ``images`` in the
metadata), ``<case>_point.json`` / ``<case>_box.json`` (prompts, upstream's format),
``<case>.npz`` (per model, variant and lesion: the exported mask as uint8,
upstream's encoded prompt, and logits: preprocessed grid and original grid, on a
regular lattice where the box is large, see ``array_keys`` in the metadata),
``metadata.json`` (upstream commit, package versions, patches, the state-dict
SHA-256 of each tiny model, the CLI check) and ``dna031_tiny_state_dict.pt``: a tiny
network's state dict written by dynamic-network-architectures 0.3.1 (upstream's
pin) from the same plans, for the key-compatibility test.

Previous-mask (tracking) prompts: ``trackmask.npz`` and the ``trackmask`` entry of ``metadata.json`` (see
``TRACK_CASES`` and :func:`run_upstream_track`): upstream's ``LesionLocatorSegTracker.track_single_lesion``
(list-of-masks branch) -> ``TrackNet.forward`` with the tiny ``LesionLocatorTrack`` model, baseline = follow-up =
a case image and the registration replaced by the identity, so each previous mask reaches TrackNet as the
already-warped mask. Recorded: the mask on the model grid, the patch (``get_patch_around_mask``), the U-Net's
prompt channel, the patch logits, the original-grid logits and the exported mask. Variants: ``fp32`` (float32
follow-up; upstream's float16 one fails on the CPU) and ``fp32_fixednonzero`` (also without the -1 "outside the
nonzero region" marker leaking into the prompt; the one we match). To record only this fixture, leaving every
other file as it is (the full run writes it too)::

    python Testing/make_upstream_fixtures.py --stage track --upstream-python /work/upstream_venv/bin/python

(about 180 kB; it needs the tracking part of upstream installed: ``unigradicon`` and ``icon_registration``, which
``pip install -c constraints.txt /work/upstream_src`` brings.)

Nothing here needs a GPU; the whole run takes about 3 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "upstream"
UPSTREAM_COMMIT_DEFAULT = "225b4194e9d3fec71ab0f9660591772568242124"
CHECKPOINT_SEED = 0
DNA031_SEED = 1234

# --------------------------------------------------------------------------- cases
# shape (z, y, x); spacing (x, y, z) mm as ITK; lesions: (centre zyx voxels, radius mm, HU)
CASES = {
    # anisotropic, single-tile patches for points and boxes; oblique direction (upstream ignores it)
    "aniso": dict(shape=(40, 100, 90), spacing=(1.6, 1.4, 2.5), seed=1, oblique=True,
                  lesions=[((18, 44, 62), 9.0, 20.0), ((25, 72, 40), 7.0, 110.0)]),
    # z spacing > 3x in-plane: nnU-Net's separate-z resampling (order 0 along z)
    "sepz": dict(shape=(14, 90, 90), spacing=(0.7, 0.7, 4.0), seed=2, oblique=False,
                 lesions=[((7, 40, 62), 10.0, 30.0), ((9, 70, 44), 8.0, 120.0)]),
    # a box larger than the tiny patch (32x48x48 at 1.0x0.8x0.8 mm): sliding window + Gaussian
    "bigbox": dict(shape=(48, 80, 80), spacing=(1.0, 1.0, 1.5), seed=3, oblique=False,
                   lesions=[((24, 40, 40), 22.0, 60.0), ((10, 20, 62), 6.0, 110.0)]),
    # "aniso" with exact zeros padded on the low z, low x and high y sides: the
    # nonzero crop starts at (6, 0, 10), which exposes upstream's point-offset bug
    "padded": dict(base="aniso", pad=((6, 0), (0, 8), (10, 0))),
    # "aniso" through a checkpoint whose plans use resample_torch_fornnunet
    "torchres": dict(base="aniso", resampling="resample_torch_fornnunet"),
    # boxes starting at the first voxel (z and x; y): upstream's box mapping underflows uint16 there
    # (max(0, uint16(0) - 1) = 65535) and the lesion is skipped ("Invalid bbox found! Skipping.")
    "edgebox": dict(base="aniso", kinds=("box",),
                    prompts={"box": [[0, 8, 40, 60, 0, 14], [10, 16, 0, 10, 40, 50]]}),
}
MODELS = {"point": "point_optimized", "box": "bbox_optimized"}


def state_dict_sha256(state: dict) -> str:
    """SHA-256 over (key, dtype, shape, bytes) of a state dict in sorted key order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def checkpoint_root(work: Path, resampling: str) -> Path:
    """Where stage 1 builds the tiny model root for a resampling function."""
    return work / f"models_{resampling}" / "LesionLocatorCheckpoint"


# --------------------------------------------------------------------------- stage 1: our env
def build_case_image(name: str):
    """(Image, label Image) of a case, built with Testing/phantoms.py."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from phantoms import ct_phantom, oblique_direction

    spec = CASES[name]
    if "base" in spec:
        img, lab = build_case_image(spec["base"])
        if "pad" in spec:
            pad = spec["pad"]
            from LesionLocatorLib.image import Image
            img = Image(np.pad(img.array, pad, constant_values=0), img.spacing, img.origin, img.direction)
            lab = Image(np.pad(lab.array, pad, constant_values=0), img.spacing, img.origin, img.direction)
        return img, lab
    return ct_phantom(spec["shape"], spec["spacing"], direction=oblique_direction(20.0) if spec["oblique"] else None,
                      seed=spec["seed"], lesions=spec["lesions"])


def stage_inputs(work: Path) -> dict:
    """Build checkpoints, images and prompt JSONs into ``work``; return the manifest."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    import torch
    from build_test_models import build_tiny_checkpoint
    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.model import load_checkpoint
    from LesionLocatorLib.prompts import VoxelPrompt, prompts_from_labels, write_upstream_json

    manifest = {"cases": {}, "checkpoints": {}}
    for name, spec in CASES.items():
        resampling = spec.get("resampling", "resample_data_or_seg_to_shape")
        root = checkpoint_root(work, resampling)
        if resampling not in manifest["checkpoints"]:
            build_tiny_checkpoint(root.parent, seed=CHECKPOINT_SEED, resampling=resampling)
            sums = {}
            for kind, sub in MODELS.items():
                ck = load_checkpoint(root / "LesionLocatorSeg" / sub / "fold_0" / "checkpoint_final.pth")
                sums[kind] = state_dict_sha256(ck["network_weights"])
            manifest["checkpoints"][resampling] = {"root": str(root), "sha256": sums}
        img, lab = build_case_image(name)
        case_dir = work / "cases" / name
        case_dir.mkdir(parents=True, exist_ok=True)
        write_image(img, case_dir / f"{name}.nii.gz")
        files = {}
        for kind in spec.get("kinds", MODELS):
            if "prompts" in spec:
                prompts = [VoxelPrompt(i, kind, c) for i, c in enumerate(spec["prompts"][kind], start=1)]
            else:
                prompts = prompts_from_labels(lab.array, kind)
            files[kind] = str(write_upstream_json(prompts, case_dir / f"{name}_{kind}.json"))
        manifest["cases"][name] = {"image": str(case_dir / f"{name}.nii.gz"), "prompts": files,
                                   "array_sha256": hashlib.sha256(np.ascontiguousarray(img.array)).hexdigest(),
                                   "resampling": resampling, "shape": list(img.shape),
                                   "spacing_xyz": list(img.spacing), "spec": _jsonable(spec)}
    manifest["torch_ours"] = torch.__version__
    return manifest


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


# --------------------------------------------------------------------------- stage 2: upstream env
class _TorchHalfIsFloat:
    """Stands in for the ``torch`` module inside upstream's lesionlocator_segment:
    everything is torch's, except ``torch.half`` which is ``torch.float32``."""

    def __init__(self, torch_module):
        self._torch = torch_module
        self.half = torch_module.float32

    def __getattr__(self, name):
        return getattr(self._torch, name)


class _fp32_accumulation:
    """Context manager: upstream's sliding-window accumulators and Gaussian in fp32."""

    def __enter__(self):
        import torch
        import lesionlocator.inference.lesionlocator_segment as seg_mod
        self.mod, self.saved = seg_mod, (seg_mod.torch, seg_mod.compute_gaussian)
        original = seg_mod.compute_gaussian

        def gaussian_fp32(*args, **kwargs):
            kwargs["dtype"] = torch.float32
            return original(*args, **kwargs)
        gaussian_fp32.cache_clear = original.cache_clear
        seg_mod.torch = _TorchHalfIsFloat(torch)
        seg_mod.compute_gaussian = gaussian_fp32
        return self

    def __exit__(self, *exc):
        self.mod.torch, self.mod.compute_gaussian = self.saved
        return False


def fixed_centroids_from_json(json_dict, data_properties, model_shape):
    """Point prompts mapped with the crop offset subtracted once (upstream's intent):
    round(clip(p - crop_lo, 0, cropped_shape) * model_shape / cropped_shape)."""
    crop_lo = np.array([b[0] for b in data_properties["bbox_used_for_cropping"]], float)
    cropped = np.array(data_properties["shape_after_cropping_and_before_resampling"], float)
    out = []
    for i in range(1, max(map(int, json_dict.keys())) + 1):
        entry = json_dict.get(str(i))
        if entry is None:
            out.append([])
            continue
        p = np.clip(np.array([float(v) for v in entry["point"]]) - crop_lo, 0, cropped)
        out.append([int(v) for v in np.round(p * np.asarray(model_shape, float) / cropped)])
    return out


def fixed_bboxes_from_json(json_dict, data_properties, model_shape):
    """Box prompts mapped as upstream intends, without its uint16 underflow at 0:
    lo = max(0, floor(max(0, b0 - crop_lo) * f) - 1), hi = min(model, ceil(min(cropped, b1 - crop_lo) * f) + 1)."""
    crop_lo = np.array([b[0] for b in data_properties["bbox_used_for_cropping"]], float)
    cropped = np.array(data_properties["shape_after_cropping_and_before_resampling"], float)
    model = np.asarray(model_shape, float)
    out = []
    for i in range(1, max(map(int, json_dict.keys())) + 1):
        entry = json_dict.get(str(i))
        if entry is None:
            out.append([])
            continue
        b = np.array([float(v) for v in entry["box"]]).reshape(3, 2)
        f = model / cropped
        lo = np.maximum(0, np.floor(np.maximum(0, b[:, 0] - crop_lo) * f) - 1)
        hi = np.minimum(model, np.ceil(np.minimum(cropped, b[:, 1] - crop_lo) * f) + 1)
        out.append([int(v) for pair in zip(lo, hi) for v in pair])
    return out


@contextlib.contextmanager
def _replaced_prompt_mapping(name: str, replacement):
    """Temporarily replace one of upstream's prompt-mapping functions (in its prompt_handler module)."""
    import lesionlocator.utilities.prompt_handling.prompt_handler as ph
    saved = getattr(ph, name)
    setattr(ph, name, replacement)
    try:
        yield
    finally:
        setattr(ph, name, saved)


def _box_of_finite(arr: np.ndarray):
    """Half-open box (lo, hi) of voxels where every channel is finite, and check it is full."""
    ok = np.all(np.isfinite(arr), axis=0)
    if not ok.any():
        return None, None
    idx = [np.flatnonzero(np.any(ok, axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
    lo = [int(i[0]) for i in idx]
    hi = [int(i[-1]) + 1 for i in idx]
    sub = ok[tuple(slice(a, b) for a, b in zip(lo, hi))]
    if not sub.all():
        raise RuntimeError("the finite logits do not form a box")
    return lo, hi


def run_upstream_prompts(model_folder: str, image: str, prompt_file: str, kind: str, variant: str, out_dir: Path):
    """Run upstream on one image and prompt file; return {lesion id: arrays}."""
    import torch
    from lesionlocator.inference.export_prediction import export_prediction_from_logits
    from lesionlocator.inference.lesionlocator_segment import LesionLocatorSegmenter
    from lesionlocator.utilities.prompt_handling import prompt_handler as ph

    import contextlib
    stack = contextlib.ExitStack()
    if variant.startswith("fp32"):
        stack.enter_context(_fp32_accumulation())
    if variant == "fp32_fixedpoint":
        stack.enter_context(_replaced_prompt_mapping("get_centroids_from_json", fixed_centroids_from_json))
    if variant == "fp32_fixedbox":
        stack.enter_context(_replaced_prompt_mapping("get_bboxes_from_json", fixed_bboxes_from_json))
    with stack:
        predictor = LesionLocatorSegmenter(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                           perform_everything_on_device=False, device=torch.device("cpu"),
                                           verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(model_folder, (0,), "checkpoint_final.pth")
        pm, cm, dj = predictor.plans_manager, predictor.configuration_manager, predictor.dataset_json
        # as preprocessing.data_iterators.preprocess_fromfiles_save_to_queue does for a .json prompt
        preprocessor = cm.preprocessor_class(verbose=False)
        data, _, props = preprocessor.run_case([image], None, pm, cm, dj)
        prompts = ph.get_prompt_from_json(prompt_file, kind, props, data.shape[1:])
        data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        crop_lo = [int(b[0]) for b in props["bbox_used_for_cropping"]]
        results = {}
        # as LesionLocatorSegmenter.predict_from_data_iterator does per lesion
        for inst_id, p in enumerate(prompts, start=1):
            encoded = [int(v) for v in p]
            dense = ph.sparse_to_dense_prompt(p, kind, array=data)
            if dense is None:
                continue
            logits = predictor.predict_logits_from_preprocessed_data(data, dense).cpu()
            out_file = str(out_dir / f"{Path(image).name[:-len('.nii.gz')]}_lesion_{inst_id}")
            export_prediction_from_logits(logits, props, cm, pm, dj, out_file, False)
            import SimpleITK as sitk
            mask = sitk.GetArrayFromImage(sitk.ReadImage(out_file + ".nii.gz")).astype(np.uint8)
            # original-grid logits: the first step of upstream's export, on the same logits
            spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
            orig = cm.resampling_fn_probabilities(logits, props["shape_after_cropping_and_before_resampling"],
                                                  cm.spacing, spacing_t)
            orig = np.asarray(orig.numpy() if isinstance(orig, torch.Tensor) else orig)
            lg = logits.numpy()
            mlo, mhi = _box_of_finite(lg)
            olo, ohi = _box_of_finite(orig)
            store = np.float16 if lg.dtype == np.float16 else np.float32
            results[inst_id] = {
                "encoded_prompt": np.array(encoded, np.int64),
                "model_lo": np.array(mlo, np.int64),
                "model_logits": lg[(slice(None),) + tuple(slice(a, b) for a, b in zip(mlo, mhi))].astype(store),
                "orig_lo": np.array([a + c for a, c in zip(olo, crop_lo)], np.int64),
                "orig_logits": orig[(slice(None),) + tuple(slice(a, b) for a, b in zip(olo, ohi))].astype(store),
                "mask": mask,
                "logits_dtype": str(lg.dtype),
            }
        info = {"crop_box": [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]],
                "model_shape": [int(v) for v in data.shape[1:]],
                "cropped_shape": [int(v) for v in props["shape_after_cropping_and_before_resampling"]]}
    return results, info


def write_dna031_state_dict(plans_file: Path, out: Path) -> dict:
    """A tiny network built by upstream's get_network_from_plans (dna 0.3.x), random init."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from lesionlocator.training.LesionLocatorTrainer.LesionLocatorTrainerSegment import LesionLocatorTrainerSegment
    from lesionlocator.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(load_json(str(plans_file)))
    cm = pm.get_configuration("3d_fullres")
    torch.manual_seed(DNA031_SEED)
    net = LesionLocatorTrainerSegment.build_network_architecture(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
        1, 2, enable_deep_supervision=False)
    state = {k: v.clone() for k, v in net.state_dict().items()}
    torch.save(state, out)
    return {"keys": len(state), "sha256": state_dict_sha256(state), "seed": DNA031_SEED}


def stage_upstream(work: Path, commit: str, cli_check: bool = True) -> None:
    """Run upstream on every case; full results go to ``work/raw/<case>.npz``."""
    import importlib.metadata as md
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    manifest = json.loads((work / "manifest.json").read_text())
    # the state dicts upstream actually loads must be the ones stage 1 built
    for resampling, ck in manifest["checkpoints"].items():
        for kind, sub in MODELS.items():
            c = torch.load(Path(ck["root"]) / "LesionLocatorSeg" / sub / "fold_0" / "checkpoint_final.pth",
                           map_location="cpu", weights_only=False)
            if state_dict_sha256(c["network_weights"]) != ck["sha256"][kind]:
                raise RuntimeError(f"checkpoint {resampling}/{kind} changed between stages")
    (work / "raw").mkdir(exist_ok=True)
    timings, infos = {}, {}
    for name, case in manifest["cases"].items():
        arrays, case_info = {}, {}
        root = Path(manifest["checkpoints"][case["resampling"]]["root"])
        for kind in case["prompts"]:
            sub = MODELS[kind]
            for variant in variants_for(name, kind):
                out_dir = work / "upstream_out" / name / kind / variant
                out_dir.mkdir(parents=True, exist_ok=True)
                t0 = time.time()
                res, info = run_upstream_prompts(str(root / "LesionLocatorSeg" / sub), case["image"],
                                                 case["prompts"][kind], kind, variant, out_dir)
                timings[f"{name}/{kind}/{variant}"] = round(time.time() - t0, 2)
                case_info.update(info)
                n_prompts = len(json.loads(Path(case["prompts"][kind]).read_text()))
                skipped = [i for i in range(1, n_prompts + 1) if i not in res]
                if skipped:
                    case_info.setdefault("skipped_by_upstream", {})[f"{kind}/{variant}"] = skipped
                for lid, r in res.items():
                    case_info.setdefault("logits_dtype", {})[f"{kind}/{variant}"] = r.pop("logits_dtype")
                    for key, val in r.items():
                        arrays[f"{kind}/{variant}/{lid}/{key}"] = val
                print(f"{name} {kind} {variant}: lesions {sorted(res)} "
                      f"({timings[f'{name}/{kind}/{variant}']} s)", flush=True)
        np.savez(work / "raw" / f"{name}.npz", **arrays)
        infos[name] = case_info
    cli = check_cli(work, manifest, infos) if cli_check else None
    plans = Path(manifest["checkpoints"]["resample_data_or_seg_to_shape"]["root"]) / \
        "LesionLocatorSeg" / "point_optimized" / "plans.json"
    dna = write_dna031_state_dict(plans, work / "raw" / "dna031_tiny_state_dict.pt")
    versions = {p: md.version(p) for p in ("lesionlocator", "torch", "dynamic_network_architectures", "numpy",
                                           "scipy", "scikit-image", "acvl_utils", "batchgenerators", "SimpleITK")}
    (work / "raw" / "upstream.json").write_text(json.dumps(
        {"versions": versions, "cases": infos, "timings_s": timings, "dna031": dna, "commit": commit,
         "cli_check": cli}, indent=1))


def check_cli(work: Path, manifest: dict, infos: dict) -> dict:
    """Run upstream's real command line (``LesionLocator_segment ... -device cpu -f 0 --disable_tta``)
    on every case and check that its masks equal the in-process ``release`` run."""
    import SimpleITK as sitk

    exe = Path(sys.executable).parent / "LesionLocator_segment"
    report = {}
    for name, case in manifest["cases"].items():
        raw = np.load(work / "raw" / f"{name}.npz")
        root = manifest["checkpoints"][case["resampling"]]["root"]
        for kind, prompt_file in case["prompts"].items():
            out = work / "cli_out" / name / kind
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run([str(exe), "-i", case["image"], "-o", str(out), "-p", prompt_file, "-t", kind, "-m", root,
                            "-f", "0", "--disable_tta", "-device", "cpu", "-npp", "1", "-nps", "1",
                            "--disable_progress_bar"], check=True, stdout=subprocess.DEVNULL)
            n_prompts = len(json.loads(Path(prompt_file).read_text()))
            diffs = {}
            for lid in range(1, n_prompts + 1):
                f = out / f"{name}_lesion_{lid}.nii.gz"
                key = f"{kind}/release/{lid}/mask"
                if key not in raw.files:
                    diffs[lid] = "skipped by both" if not f.exists() else "CLI wrote a mask the harness skipped"
                    continue
                cli_mask = sitk.GetArrayFromImage(sitk.ReadImage(str(f))).astype(np.uint8)
                diffs[lid] = int(np.sum(cli_mask != raw[key]))
            report[f"{name}/{kind}"] = diffs
            print(f"CLI check {name} {kind}: voxels differing from the in-process release run {diffs}", flush=True)
            if any(v != 0 and v != "skipped by both" for v in diffs.values()):
                raise RuntimeError(f"upstream's CLI and the in-process harness disagree on {name}/{kind}: {diffs}")
    return report


def variants_for(case: str, kind: str) -> list:
    """Upstream runs per case and model (see the module docstring)."""
    if case == "padded" and kind == "point":
        return ["release", "fp32", "fp32_fixedpoint"]
    if case == "edgebox":
        return ["release", "fp32_fixedbox"]
    return ["release", "fp32"]


def compared_variant(case: str, kind: str) -> str:
    """The upstream run our output must match."""
    return {("padded", "point"): "fp32_fixedpoint", ("edgebox", "box"): "fp32_fixedbox"}.get((case, kind), "fp32")


def lattice_step(shape, max_voxels: int) -> int:
    """Smallest stride s with prod(ceil(n / s)) <= max_voxels."""
    s = 1
    while np.prod([-(-n // s) for n in shape]) > max_voxels:
        s += 1
    return s


# size caps of the stored logits (voxels per prediction); masks are stored whole
MODEL_MAX_VOXELS = 4000     # fp32 run, preprocessed grid: a regular lattice [::s, ::s, ::s] of the predicted box
ORIG_MAX_VOXELS = 8000      # fp32 run, original grid, covered box
RELEASE_MAX_VOXELS = 2000   # fp16 release run, original grid (fp16 values, stored as float16)


def pack(work: Path, fixtures: Path) -> None:
    """Write the committed fixtures from the raw upstream results (our environment)."""
    manifest = json.loads((work / "manifest.json").read_text())
    up = json.loads((work / "raw" / "upstream.json").read_text())
    fixtures.mkdir(parents=True, exist_ok=True)
    for f in fixtures.iterdir():
        f.unlink()
    images = {}
    for name, case in manifest["cases"].items():
        raw = np.load(work / "raw" / f"{name}.npz")
        out = {}
        for key in raw.files:
            kind, variant, lid, field_ = key.split("/")
            val = raw[key]
            compared = variant == compared_variant(name, kind)
            if field_ in ("encoded_prompt", "mask"):
                out[key] = val.astype(np.uint8) if field_ == "mask" else val
            elif field_ == "model_logits" and compared:
                s = lattice_step(val.shape[1:], MODEL_MAX_VOXELS)
                out[key] = val[:, ::s, ::s, ::s]
                out[f"{kind}/{variant}/{lid}/model_step"] = np.array(s)
                out[f"{kind}/{variant}/{lid}/model_lo"] = lo = raw[f"{kind}/{variant}/{lid}/model_lo"]
                out[f"{kind}/{variant}/{lid}/model_hi"] = lo + np.array(val.shape[1:])
            elif field_ == "orig_logits" and (compared or variant == "release"):
                s = lattice_step(val.shape[1:], ORIG_MAX_VOXELS if compared else RELEASE_MAX_VOXELS)
                out[key] = val[:, ::s, ::s, ::s]
                out[f"{kind}/{variant}/{lid}/orig_step"] = np.array(s)
                out[f"{kind}/{variant}/{lid}/orig_lo"] = lo = raw[f"{kind}/{variant}/{lid}/orig_lo"]
                out[f"{kind}/{variant}/{lid}/orig_hi"] = lo + np.array(val.shape[1:])
        np.savez_compressed(fixtures / f"{name}.npz", **out)
        for kind, f in case["prompts"].items():
            shutil.copyfile(f, fixtures / f"{name}_{kind}.json")
        spec = CASES[name]
        base = spec.get("base", name)
        if base == name:
            shutil.copyfile(case["image"], fixtures / f"{name}.nii.gz")
        images[name] = {"file": f"{base}.nii.gz", "pad": spec.get("pad"), "sha256": case["array_sha256"]}
    shutil.copyfile(work / "raw" / "dna031_tiny_state_dict.pt", fixtures / "dna031_tiny_state_dict.pt")
    meta = {
        "upstream": {"repository": "https://github.com/MIC-DKFZ/LesionLocator", "commit": up["commit"],
                     "license": "GPL-3.0 (not vendored; only its outputs are stored here)"},
        "upstream_env_versions": up["versions"],
        "our_env_torch": manifest["torch_ours"],
        "generated_by": "Testing/make_upstream_fixtures.py",
        "call": "LesionLocatorSegmenter(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, "
                "device=cpu); initialize_from_trained_model_folder(<model>, (0,)); DefaultPreprocessor.run_case; "
                "get_prompt_from_json; sparse_to_dense_prompt; predict_logits_from_preprocessed_data; "
                "export_prediction_from_logits(save_probabilities=False)",
        "variants": {
            "release": "upstream unchanged: sliding-window logits and Gaussian accumulated in fp16",
            "fp32": "run-time patch: lesionlocator.inference.lesionlocator_segment.torch replaced by a proxy whose "
                    ".half is torch.float32 (only the two accumulators in _internal_predict_sliding_window_return_"
                    "logits use it); lesionlocator_segment.compute_gaussian called with dtype=torch.float32",
            "fp32_fixedpoint": "fp32, and prompt_handler.get_centroids_from_json replaced by the fixed point "
                               "mapping round(clip(p - crop_lo, 0, cropped_shape) * model_shape / cropped_shape); "
                               "upstream subtracts crop_lo twice for points",
            "fp32_fixedbox": "fp32, and prompt_handler.get_bboxes_from_json replaced by the same box mapping "
                             "computed without upstream's uint16 underflow (max(0, uint16(0) - 1) = 65535 makes "
                             "upstream skip every box whose low edge maps to preprocessed voxel 0)",
        },
        "compared_variant": {n: {k: compared_variant(n, k) for k in c["prompts"]}
                             for n, c in manifest["cases"].items()},
        "array_keys": "<model>/<variant>/<lesion id>/...: encoded_prompt (upstream's prompt in the preprocessed "
                      "grid), mask (uint8, the exported <case>_lesion_<id>.nii.gz, whole image, z y x); "
                      "model_logits (fp32 run only): upstream's preprocessed-grid logits (cropped, resampled, "
                      "unpadded) at voxels model_lo + model_step * index, inside the half-open box [model_lo, "
                      "model_hi) where they are finite (NaN elsewhere: not predicted); orig_logits: the same "
                      "logits resampled to the input grid "
                      "by upstream's resampling_fn_probabilities, at voxels orig_lo + orig_step * index inside "
                      "[orig_lo, orig_hi), the box where they are finite (fp32 run; release run as float16)",
        "images": images,
        "checkpoint": {"builder": "Testing/build_test_models.build_tiny_checkpoint(root, seed=0, resampling=...)",
                       "state_dict_sha256": {r: c["sha256"] for r, c in manifest["checkpoints"].items()}},
        "dna031_state_dict": dict(up["dna031"], file="dna031_tiny_state_dict.pt",
                                  built_with="lesionlocator LesionLocatorTrainerSegment.build_network_architecture "
                                             "from the tiny point plans, 1+1 input channels, 2 outputs, "
                                             "torch.manual_seed(1234), He init"),
        "cases": {n: dict({k: v for k, v in c.items() if k not in ("image", "prompts", "array_sha256")},
                          kinds=list(c["prompts"]), upstream=up["cases"][n]) for n, c in manifest["cases"].items()},
        "cli_check": up.get("cli_check"),
        "timings_s": up["timings_s"],
    }
    if "track" in manifest:
        meta[TRACK_FIXTURE] = pack_track(work, fixtures)
    (fixtures / "metadata.json").write_text(json.dumps(meta, indent=1))
    total = sum(f.stat().st_size for f in fixtures.iterdir())
    print(f"fixtures in {fixtures}: {total / 1e6:.2f} MB")


# --------------------------------------------------------------------------- previous-mask (tracking) prompts
# Upstream's tracker (lesionlocator/inference/lesionlocator_segment_and_track.py, LesionLocatorSegTracker) gets the
# previous mask as a label file, preprocesses it with the previous scan (DefaultPreprocessor.run_case: nonzero crop,
# resampling_fn_seg), and TrackNet.forward (lesionlocator/modules/tracknet.py) warps it onto the follow-up's model
# grid, puts one patch on the warped mask's rounded centre of mass (get_patch_around_mask), pads a short patch
# (pad_input) and runs the U-Net on [follow-up patch, warped-mask patch]. The fixture runs exactly that with the
# registration bypassed: baseline = follow-up = the case image, and the warp is the identity (see
# run_upstream_track), so the mask arrives as "already warped" on the follow-up's grid.
# masks: ellipsoids (centre zyx voxels, semi-axes zyx mm) on the case image's grid
TRACK_CASES = {
    # anisotropic, not oblique; model grid (19, 75, 75): shorter than the patch along z (pad_input pads z)
    "sepz": dict(masks=[((7, 40, 62), (9.0, 8.0, 6.5)),
                        ((12, 70, 2), (6.0, 7.0, 6.0)),       # touches the high-z and the x = 0 faces
                        ((8.1, 41.0, 31.9), (8.6, 7.6, 6.6))]),  # off-grid centre
    # model grid (33, 167, 171): no padding; the patch is clamped at the high-z/y/x corner for the second mask
    "aniso": dict(masks=[((18, 44, 62), (8.0, 10.0, 7.0)),
                         ((39, 97, 88), (6.0, 8.0, 9.0)),     # touches the high-z, high-y and high-x faces
                         # off-grid centre: the rounded centre of mass of the model-grid mask (upstream) is
                         # (21, 105, 78), the original-grid centre of mass mapped to the model grid rounds to
                         # (21, 105, 79): the patch moves by one voxel
                         ((25.6, 62.9, 41.1), (7.3, 9.1, 8.4))]),
}
TRACK_FIXTURE = "trackmask"
TRACK_VARIANTS = ("fp32_fixednonzero", "fp32")   # the first is the one our output must match
TRACK_MODEL_MAX_VOXELS = 1500   # U-Net patch logits: lattice [::s, ::s, ::s]
TRACK_ORIG_MAX_VOXELS = 2500    # original-grid logits: lattice over the box the patch influences


def ellipsoid_mask(shape, spacing_zyx, centre, semi_axes_mm) -> np.ndarray:
    """bool (z, y, x): voxels with sum(((i - centre) * spacing / semi_axis)^2) <= 1."""
    g = np.meshgrid(*[np.arange(n, dtype=float) for n in shape], indexing="ij")
    d = sum(((g[a] - centre[a]) * spacing_zyx[a] / semi_axes_mm[a]) ** 2 for a in range(3))
    return d <= 1.0


def stage_track_inputs(work: Path) -> dict:
    """Tiny checkpoint (with its LesionLocatorTrack model), case images and previous-mask files."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    from build_test_models import build_tiny_checkpoint
    from LesionLocatorLib.image import write_image
    from LesionLocatorLib.model import load_checkpoint

    resampling = "resample_data_or_seg_to_shape"
    root = checkpoint_root(work, resampling)
    if not (root / "LesionLocatorTrack" / "fold_0" / "checkpoint_final.pth").exists():
        build_tiny_checkpoint(root.parent, seed=CHECKPOINT_SEED, resampling=resampling)
    ck = load_checkpoint(root / "LesionLocatorTrack" / "fold_0" / "checkpoint_final.pth")
    out = {"root": str(root), "resampling": resampling, "sha256": state_dict_sha256(ck["network_weights"]),
           "cases": {}}
    for name, spec in TRACK_CASES.items():
        img, _ = build_case_image(name)
        case_dir = work / "track" / name
        case_dir.mkdir(parents=True, exist_ok=True)
        image_file = write_image(img, case_dir / f"{name}.nii.gz")
        masks = []
        for i, (centre, axes) in enumerate(spec["masks"], start=1):
            m = ellipsoid_mask(img.shape, img.spacing_zyx, centre, axes)
            masks.append(str(write_image(img.with_array(m.astype(np.uint8)), case_dir / f"{name}_prev_{i}.nii.gz")))
        out["cases"][name] = {"image": str(image_file), "masks": masks,
                              "array_sha256": hashlib.sha256(np.ascontiguousarray(img.array)).hexdigest()}
    return out


def run_upstream_track(model_folder: str, image: str, mask_files: list, variant: str, out_dir: Path):
    """Upstream's tracker on one image with the registration bypassed; return ({lesion id: arrays}, info, errors).

    ``LesionLocatorSegTracker.track_single_lesion`` (list-of-mask-files branch) is called per lesion with baseline
    = follow-up = ``image``, as ``LesionLocatorSegTracker.track`` calls it. The tracker is set up as its
    ``__init__`` does (network from ``LesionLocatorTrainerTrack.build_network_architecture``, fold 0), except that
    ``TrackNet.reg_net`` is a stub and ``tracknet.compute_warped_image_multiNC`` returns the mask unchanged: an
    identity registration. TrackNet's resizing of the mask to the registration grid (175^3, nearest-exact) and
    back is kept; it is the identity for model-grid sizes <= 175 (checked: ``roundtrip_identity``).
    ``variant``: ``fp32`` (follow-up image passed as float32; upstream's ``track`` passes float16, which the
    U-Net rejects on the CPU: "Input type (c10::Half) and bias type (float) should be the same"), or
    ``fp32_fixednonzero``: fp32, and ``crop_to_nonzero`` (as ``DefaultPreprocessor`` calls it) given
    ``nonzero_label=0``, so the previous mask is not marked -1 where the image is 0 outside its filled nonzero
    region (upstream's list-of-masks branch feeds those -1 voxels to TrackNet as prompt and centre-of-mass voxels).
    """
    import torch
    import SimpleITK as sitk
    from batchgenerators.utilities.file_and_folder_operations import join, load_json
    import lesionlocator.modules.tracknet as tracknet
    from lesionlocator.inference.lesionlocator_segment_and_track import LesionLocatorSegTracker
    from lesionlocator.training.LesionLocatorTrainer.LesionLocatorTrainerTrack import LesionLocatorTrainerTrack
    from lesionlocator.utilities.label_handling.label_handling import determine_num_input_channels
    from lesionlocator.utilities.plans_handling.plans_handler import PlansManager

    class IdentityRegistration(torch.nn.Module):
        phi_AB_vectorfield = None
        spacing = None

        def forward(self, x0, x1):
            return torch.zeros(())

    def identity_warp(img, phi, spacing, spline_order=1, zero_boundary=False):
        assert phi is None and spline_order == 0 and zero_boundary
        return img

    dataset_json = load_json(join(model_folder, "dataset.json"))
    pm = PlansManager(load_json(join(model_folder, "plans.json")))
    ck = torch.load(join(model_folder, "fold_0", "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    cm = pm.get_configuration(ck["init_args"]["configuration"])
    network = LesionLocatorTrainerTrack.build_network_architecture(
        cm.network_arch_class_name, cm.network_arch_init_kwargs, cm.network_arch_init_kwargs_req_import,
        determine_num_input_channels(pm, cm, dataset_json), pm.get_label_manager(dataset_json).num_segmentation_heads,
        cm.patch_size, enable_deep_supervision=False)
    network.reg_net = IdentityRegistration()
    params = {k: v for k, v in ck["network_weights"].items() if not k.startswith("reg_net.")}
    network.load_state_dict(params)  # strict: every U-Net weight and the unet_patch_size buffer
    tracker = LesionLocatorSegTracker.__new__(LesionLocatorSegTracker)
    tracker.plans_manager, tracker.configuration_manager, tracker.dataset_json = pm, cm, dataset_json
    tracker.list_of_parameters, tracker.network = [params], network
    tracker.trainer_name = ck["trainer_name"]
    tracker.allowed_mirroring_axes = ck.get("inference_allowed_mirroring_axes")
    tracker.label_manager = pm.get_label_manager(dataset_json)
    tracker.tile_step_size, tracker.use_gaussian, tracker.use_mirroring = 0.5, True, False  # --disable_tta
    tracker.device = torch.device("cpu")

    rec = {}
    original_patch_fn = tracknet.TrackNet.get_patch_around_mask

    def spy_patch(self, prompt, is_inference=False):
        slicers = original_patch_fn(self, prompt, is_inference)
        rec["warped_prompt"] = prompt[0, 0].float().numpy().copy()
        rec["slicer"] = [int(v) for v in slicers[0]]
        return slicers

    def spy_unet(module, inputs, output):
        rec["unet_input"] = inputs[0].detach().float().numpy().copy()
        rec["unet_output"] = output.detach().float().numpy().copy()

    def spy_net(module, inputs, output):
        rec["prompt_in"] = inputs[2].detach().float().numpy().copy()
        rec["logits"] = output.detach().float().clone()

    import lesionlocator.preprocessing.preprocessors.default_preprocessor as dp
    saved_crop = dp.crop_to_nonzero
    if variant == "fp32_fixednonzero":
        dp.crop_to_nonzero = lambda data, seg=None, nonzero_label=-1: saved_crop(data, seg, 0)
    saved_warp = tracknet.compute_warped_image_multiNC
    tracknet.compute_warped_image_multiNC = identity_warp
    tracknet.TrackNet.get_patch_around_mask = spy_patch
    hooks = [network.unet.register_forward_hook(spy_unet), network.register_forward_hook(spy_net)]
    results, errors = {}, {}
    try:
        preprocessor = cm.preprocessor_class(verbose=False)
        fu, _, props = preprocessor.run_case([image], None, pm, cm, dataset_json)  # as LesionLocatorSegTracker.track
        fu_t = torch.from_numpy(fu.astype(np.float32)).unsqueeze_(0)
        for lid in range(1, len(mask_files) + 1):
            rec.clear()
            with torch.no_grad():
                try:
                    out_file = tracker.track_single_lesion(lid, None, fu_t, image, image, str(out_dir),
                                                           list(mask_files), props, preprocessor)
                except Exception as e:  # noqa: BLE001 - recorded in the metadata
                    errors[lid] = f"{type(e).__name__}: {e}"
                    continue
            if out_file is None:
                errors[lid] = "skipped by upstream (empty prompt after preprocessing)"
                continue
            mask = sitk.GetArrayFromImage(sitk.ReadImage(out_file + ".nii.gz")).astype(np.uint8)
            logits = rec["logits"][0]  # (2, model grid): patch logits, [1, 0] elsewhere
            spacing_t = [props["spacing"][i] for i in pm.transpose_forward]
            cropped = props["shape_after_cropping_and_before_resampling"]

            def to_orig(x):
                o = cm.resampling_fn_probabilities(x, cropped, cm.spacing, spacing_t)
                return np.asarray(o.numpy() if isinstance(o, torch.Tensor) else o, np.float32)
            orig = to_orig(logits)
            inside = torch.zeros((1,) + tuple(logits.shape[1:]))
            s = rec["slicer"]
            inside[0, s[0]:s[1], s[2]:s[3], s[4]:s[5]] = 1.0
            touched = to_orig(inside)[0] > 1e-6   # original voxels the patch logits reach
            idx = [np.flatnonzero(np.any(touched, axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
            olo, ohi = [int(i[0]) for i in idx], [int(i[-1]) + 1 for i in idx]
            warped = rec["warped_prompt"]
            prev = (rec["prompt_in"][0, 0])
            crop_lo = [int(b[0]) for b in props["bbox_used_for_cropping"]]
            sl = tuple(slice(a, b) for a, b in zip(olo, ohi))
            results[lid] = {
                "prompt_model_grid": warped.astype(np.int8),    # the warped mask TrackNet centres on
                "prompt_roundtrip_identity": np.array(np.array_equal(warped, prev)),
                "slicer": np.array(rec["slicer"], np.int64),    # [z0, z1, y0, y1, x0, x1], model grid
                "unet_input_prompt": rec["unet_input"][0, 1],  # the prompt channel the U-Net gets (padded patch)
                "unet_input_image": rec["unet_input"][0, 0],
                "patch_logits": rec["unet_output"][0],          # U-Net output for the padded patch
                "orig_lo": np.array([a + c for a, c in zip(olo, crop_lo)], np.int64),
                "orig_logits": orig[(slice(None),) + sl],
                "mask": mask,
            }
        info = {"crop_box": [[int(a), int(b)] for a, b in props["bbox_used_for_cropping"]],
                "model_shape": [int(v) for v in fu.shape[1:]],
                "cropped_shape": [int(v) for v in props["shape_after_cropping_and_before_resampling"]],
                "patch_size": [int(v) for v in cm.patch_size]}
    finally:
        for h in hooks:
            h.remove()
        tracknet.compute_warped_image_multiNC = saved_warp
        dp.crop_to_nonzero = saved_crop
        tracknet.TrackNet.get_patch_around_mask = original_patch_fn
    return results, info, errors


def stage_upstream_track(work: Path, commit: str) -> None:
    """Run upstream's tracker on every TRACK_CASES case; results go to ``work/raw/trackmask.npz``."""
    import importlib.metadata as md
    import torch

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    track = json.loads((work / "manifest.json").read_text())["track"]
    root = Path(track["root"])
    c = torch.load(root / "LesionLocatorTrack" / "fold_0" / "checkpoint_final.pth", map_location="cpu",
                   weights_only=False)
    if state_dict_sha256(c["network_weights"]) != track["sha256"]:
        raise RuntimeError("the Track checkpoint changed between stages")
    (work / "raw").mkdir(exist_ok=True)
    arrays, infos, timings = {}, {}, {}
    for name, case in track["cases"].items():
        infos[name] = {}
        for variant in TRACK_VARIANTS:
            out_dir = work / "upstream_out" / "track" / name / variant
            out_dir.mkdir(parents=True, exist_ok=True)
            t0 = time.time()
            res, info, errors = run_upstream_track(str(root / "LesionLocatorTrack"), case["image"], case["masks"],
                                                   variant, out_dir)
            timings[f"{name}/{variant}"] = round(time.time() - t0, 2)
            infos[name].update(info)
            if errors:
                infos[name].setdefault("errors", {})[variant] = errors
            for lid, r in res.items():
                for key, val in r.items():
                    arrays[f"{name}/{variant}/{lid}/{key}"] = val
            print(f"track {name} {variant}: lesions {sorted(res)}, errors {errors} ({timings[f'{name}/{variant}']} s)",
                  flush=True)
    np.savez(work / "raw" / f"{TRACK_FIXTURE}.npz", **arrays)
    versions = {p: md.version(p) for p in ("lesionlocator", "torch", "dynamic_network_architectures", "numpy",
                                           "scipy", "scikit-image", "batchgenerators", "SimpleITK")}
    (work / "raw" / "upstream_track.json").write_text(json.dumps(
        {"versions": versions, "cases": infos, "timings_s": timings, "commit": commit}, indent=1))


def _bbox(mask: np.ndarray):
    idx = [np.flatnonzero(np.any(mask, axis=tuple(b for b in range(mask.ndim) if b != a))) for a in range(mask.ndim)]
    return [int(i[0]) for i in idx], [int(i[-1]) + 1 for i in idx]


def pack_track(work: Path, fixtures: Path) -> dict:
    """Write ``<fixtures>/trackmask.npz`` from the raw upstream results; return its metadata entry."""
    import SimpleITK as sitk

    manifest = json.loads((work / "manifest.json").read_text())
    track = manifest["track"]
    up = json.loads((work / "raw" / "upstream_track.json").read_text())
    raw = np.load(work / "raw" / f"{TRACK_FIXTURE}.npz")
    out, cases = {}, {}
    for name, case in track["cases"].items():
        for lid, f in enumerate(case["masks"], start=1):
            out[f"{name}/{lid}/previous_mask"] = sitk.GetArrayFromImage(sitk.ReadImage(f)).astype(np.uint8)
            for variant in TRACK_VARIANTS:
                pre = f"{name}/{variant}/{lid}/"
                if pre + "mask" not in raw.files:
                    continue
                out[pre + "mask"] = raw[pre + "mask"].astype(np.uint8)
                out[pre + "slicer"] = raw[pre + "slicer"]
                out[pre + "prompt_roundtrip_identity"] = raw[pre + "prompt_roundtrip_identity"]
                out[pre + "unet_input_prompt"] = raw[pre + "unet_input_prompt"].astype(np.int8)
                pm = raw[pre + "prompt_model_grid"]
                lo, hi = _bbox(pm != 0)
                out[pre + "prompt_model_grid_lo"] = np.array(lo, np.int64)
                out[pre + "prompt_model_grid"] = pm[tuple(slice(a, b) for a, b in zip(lo, hi))].astype(np.int8)
                out[pre + "prompt_model_grid_sum"] = np.array(int(np.sum(pm)))
                if variant != TRACK_VARIANTS[0]:
                    continue
                lg = raw[pre + "patch_logits"]
                s = lattice_step(lg.shape[1:], TRACK_MODEL_MAX_VOXELS)
                out[pre + "patch_logits"] = lg[:, ::s, ::s, ::s]
                out[pre + "patch_step"] = np.array(s)
                og = raw[pre + "orig_logits"]
                s = lattice_step(og.shape[1:], TRACK_ORIG_MAX_VOXELS)
                out[pre + "orig_logits"] = og[:, ::s, ::s, ::s]
                out[pre + "orig_step"] = np.array(s)
                out[pre + "orig_lo"] = lo = raw[pre + "orig_lo"]
                out[pre + "orig_hi"] = lo + np.array(og.shape[1:])
        cases[name] = dict(up["cases"][name], image=f"{name}.nii.gz", array_sha256=case["array_sha256"],
                           masks=[{"centre_zyx_voxels": list(c), "semi_axes_zyx_mm": list(a)}
                                  for c, a in TRACK_CASES[name]["masks"]])
    np.savez_compressed(fixtures / f"{TRACK_FIXTURE}.npz", **out)
    return {
        "file": f"{TRACK_FIXTURE}.npz",
        "upstream_env_versions": up["versions"],
        "commit": up["commit"],
        "checkpoint": {"builder": "Testing/build_test_models.build_tiny_checkpoint(root, seed=0) -> LesionLocatorTrack",
                       "state_dict_sha256": track["sha256"]},
        "call": "LesionLocatorSegTracker.track_single_lesion(lesion, None, follow-up, image, image, out, "
                "[previous mask files], properties, DefaultPreprocessor) per lesion, baseline = follow-up = the case "
                "image, use_mirroring False, fold 0; the tracker's attributes set as its __init__ does, network from "
                "LesionLocatorTrainerTrack.build_network_architecture with reg_net replaced by a stub and "
                "lesionlocator.modules.tracknet.compute_warped_image_multiNC by the identity (registration "
                "bypassed); the Track checkpoint's U-Net weights and unet_patch_size loaded strictly",
        "compared_variant": TRACK_VARIANTS[0],
        "variants": {"fp32": "the follow-up image passed as float32 (upstream's track() passes float16 and runs the "
                             "U-Net under fp16 autocast on CUDA; on the CPU its float32 U-Net rejects the float16 "
                             "input: 'RuntimeError: Input type (c10::Half) and bias type (float) should be the same', "
                             "observed with this harness)",
                     "fp32_fixednonzero": "fp32, and DefaultPreprocessor's crop_to_nonzero called with "
                                          "nonzero_label=0: upstream (list-of-masks branch) otherwise feeds the -1 "
                                          "that nnU-Net writes into a segmentation where the image is 0 outside "
                                          "its filled nonzero region to TrackNet as prompt voxels (value -1, "
                                          "counted by the centre of mass); its instance-label branch "
                                          "(prompts == lesion index) does not"},
        "array_keys": "<case>/<lesion>/previous_mask (uint8, the mask file on the image grid, z y x); "
                      "<case>/<variant>/<lesion>/...: mask (the exported <case>_lesion_<id>.nii.gz), "
                      "slicer ([z0, z1, y0, "
                      "y1, x0, x1] of the patch in the unpadded model grid, get_patch_around_mask), "
                      "unet_input_prompt (int8, the prompt channel of the U-Net input, patch size, after pad_input), "
                      "prompt_model_grid (the preprocessed previous mask TrackNet centres its patch on, int8, "
                      "cropped to its nonzero box starting at prompt_model_grid_lo; prompt_model_grid_sum its sum "
                      "over the whole grid), prompt_roundtrip_identity (TrackNet's 175^3 nearest-exact round trip "
                      "left it unchanged); compared variant only: patch_logits (the U-Net output for its whole "
                      "input patch, which starts at "
                      "slicer start - (patch_size - slicer extent) // 2, lattice [::patch_step]), "
                      "orig_logits (TrackNet's output, patch logits and [1, 0] elsewhere, resampled by upstream's "
                      "resampling_fn_probabilities, at voxels orig_lo + orig_step * index inside [orig_lo, orig_hi), "
                      "the box of original voxels whose interpolation reads a patch voxel)",
        "cases": cases,
        "timings_s": up["timings_s"],
    }


def run_track_only(work: Path, fixtures: Path, upstream_python: str, commit: str) -> None:
    """Record only the previous-mask fixture: write trackmask.npz and add the ``trackmask`` entry to an existing
    metadata.json, leaving every other fixture file as it is."""
    manifest = {"track": stage_track_inputs(work)}
    import torch
    manifest["torch_ours"] = torch.__version__
    (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
    subprocess.run([upstream_python, str(Path(__file__).resolve()), "--stage", "upstream-track", "--work", str(work),
                    "--commit", commit], check=True, env=dict(os.environ, PYTHONPATH=""), cwd=str(work))
    entry = pack_track(work, fixtures)
    meta_file = fixtures / "metadata.json"
    meta = json.loads(meta_file.read_text())
    meta[TRACK_FIXTURE] = entry
    meta_file.write_text(json.dumps(meta, indent=1))
    print(f"{fixtures / (TRACK_FIXTURE + '.npz')}: {(fixtures / (TRACK_FIXTURE + '.npz')).stat().st_size / 1e3:.1f} kB")


# --------------------------------------------------------------------------- driver
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upstream-python", default="/work/upstream_venv/bin/python",
                    help="python of the virtual environment where upstream LesionLocator is installed")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--out", default=str(FIXTURES), help="fixture folder")
    ap.add_argument("--commit", default=os.environ.get("LESIONLOCATOR_UPSTREAM_COMMIT", UPSTREAM_COMMIT_DEFAULT),
                    help="the upstream commit that is installed (recorded in metadata.json)")
    ap.add_argument("--stage", choices=["all", "upstream", "pack", "track", "upstream-track"], default="all",
                    help="all (default); upstream: only the upstream runs (upstream python); pack: only rewrite "
                         "the fixtures from an existing --work folder; track: only the previous-mask fixture "
                         "(trackmask.npz, added to the existing metadata.json; other files untouched); "
                         "upstream-track: its upstream runs (upstream python)")
    ap.add_argument("--no-cli-check", action="store_true",
                    help="skip running upstream's LesionLocator_segment command on every case (about 13 s each) to "
                         "check that the in-process harness reproduces its masks")
    a = ap.parse_args(argv)
    work = Path(a.work or tempfile.mkdtemp(prefix="ll_upstream_"))
    work.mkdir(parents=True, exist_ok=True)
    if a.stage == "upstream":
        stage_upstream(work, a.commit, cli_check=not a.no_cli_check)
        if "track" in json.loads((work / "manifest.json").read_text()):
            stage_upstream_track(work, a.commit)
        return
    if a.stage == "upstream-track":
        stage_upstream_track(work, a.commit)
        return
    if a.stage == "track":
        run_track_only(work, Path(a.out), a.upstream_python, a.commit)
        return
    if a.stage == "all":
        manifest = stage_inputs(work)
        manifest["track"] = stage_track_inputs(work)
        (work / "manifest.json").write_text(json.dumps(manifest, indent=1))
        env = dict(os.environ, PYTHONPATH="")
        subprocess.run([a.upstream_python, str(Path(__file__).resolve()), "--stage", "upstream",
                        "--work", str(work), "--commit", a.commit] + (["--no-cli-check"] if a.no_cli_check else []),
                       check=True, env=env, cwd=str(work))
    pack(work, Path(a.out))


if __name__ == "__main__":
    main()
