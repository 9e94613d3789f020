"""LesionLocatorLib: promptable 3D lesion segmentation and longitudinal tracking.

Pure Python (torch, nnunetv2, SimpleITK, numpy); never imports slicer, qt or vtk.
World coordinates are LPS millimetres; arrays are (z, y, x).
"""
__version__ = "0.1.0"
