"""Former home of measurement, evaluation and tables (kept so that existing scripts keep working).

Measurement is :mod:`LesionLocatorLib.measure`, scores against a ground truth
:mod:`LesionLocatorLib.evaluate`, tables :mod:`LesionLocatorLib.report`.
"""
from .evaluate import LABEL_EXTENSIONS, aggregate, dice, evaluate_case, evaluate_folders, normalized_surface_dice
from .measure import axial_diameters, centre_of_mass_world, change_table, lesion_measurements, lesion_volume_ml, \
    recist_category
from .report import format_table, write_table

__all__ = ["dice", "normalized_surface_dice", "lesion_volume_ml", "axial_diameters", "centre_of_mass_world",
           "change_table", "recist_category", "lesion_measurements", "evaluate_case", "aggregate",
           "evaluate_folders", "write_table", "format_table", "LABEL_EXTENSIONS"]
