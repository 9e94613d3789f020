"""How a lesion is shown wherever it appears: its name and its colour, the same at every timepoint
and in every output (Slicer segments and table, DICOM SEG segments and SR tracking identifiers)."""
from __future__ import annotations

# lesion N gets LESION_COLORS[(N - 1) % len(LESION_COLORS)] (RGB 0..1)
LESION_COLORS = [
    (0.902, 0.098, 0.294), (0.235, 0.706, 0.294), (0.263, 0.388, 0.847), (0.961, 0.510, 0.192),
    (0.569, 0.118, 0.706), (0.275, 0.941, 0.941), (0.941, 0.196, 0.902), (0.824, 0.961, 0.235),
    (0.980, 0.745, 0.831), (0.000, 0.502, 0.502), (0.863, 0.745, 1.000), (0.667, 0.431, 0.157),
    (1.000, 0.980, 0.784), (0.502, 0.000, 0.000), (0.667, 1.000, 0.765), (0.502, 0.502, 0.000),
]


def lesion_color(lesion_id: int) -> tuple:
    """The RGB colour (0..1) of lesion ``lesion_id`` (IDs start at 1)."""
    return LESION_COLORS[(int(lesion_id) - 1) % len(LESION_COLORS)]


def lesion_label(lesion_id: int) -> str:
    """The lesion's name in outputs: 'Lesion N' (Slicer's segment name, the SEG segment label and
    the SR Tracking Identifier)."""
    return f"Lesion {int(lesion_id)}"
