"""Temporary demo: segment a CT-like phantom with a RANDOM-WEIGHT tiny model.

Until the trained demo model ships (see the synthetic-data issue), this shows the
whole command-line path working end to end: it builds a tiny random-weight
checkpoint in the official layout and a CT-like phantom with two lesions, then
runs ``lesionlocator segment``. The masks are NOT meaningful segmentations.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from build_test_models import build_tiny_checkpoint  # noqa: E402
from phantoms import ct_phantom, oblique_direction  # noqa: E402
from LesionLocatorLib.cli import main  # noqa: E402
from LesionLocatorLib.image import write_image  # noqa: E402

out = Path(sys.argv[1] if len(sys.argv) > 1 else "demo_output")
out.mkdir(parents=True, exist_ok=True)
print("NOTE: random-weight model, for checking the installation only; the masks are not meaningful.")
model = build_tiny_checkpoint(out / "model")
image, labels = ct_phantom(shape_zyx=(60, 160, 150), spacing_xyz=(1.2, 1.2, 2.5), direction=oblique_direction(),
                           lesions=[((30, 70, 50), 12.0, 110), ((25, 100, 110), 8.0, -20)])
write_image(image, out / "case.nii.gz")
(out / "case.json").write_text(json.dumps({"1": {"point": [30, 70, 50]}, "2": {"point": [25, 100, 110]}}))
sys.exit(main(["segment", "-i", str(out / "case.nii.gz"), "-p", str(out / "case.json"), "-t", "point",
               "-o", str(out / "prediction"), "-m", str(model)]))
