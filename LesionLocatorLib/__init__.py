"""LesionLocatorLib: promptable 3D lesion segmentation and longitudinal tracking.

Pure Python (torch, nnunetv2, SimpleITK, numpy); never imports slicer, qt or vtk.
World coordinates are LPS millimetres; arrays are (z, y, x). One job per module:

* inference core: ``image`` (Image, I/O, world <-> index; ``imagechecks``: geometry and voxel
  rules, ``imagefiles``: truncated or corrupt files), ``prompts`` (the user's Point, Box,
  MaskPrompt and prompt files), ``encoding`` (prompt channels as the network saw them in
  training), ``modelgrid`` (nnU-Net's preprocessing, computed only around a prompt), ``plans``
  (plans.json as data: the architecture allow-list, network building), ``modelfolder`` (the
  official folder layout, checked without torch), ``model`` (loading networks and weights),
  ``predict`` (prompt -> mask);
* longitudinal: ``register`` (registration backends), ``track`` (the autoregressive loop),
  ``study`` (``track_study``: the pipeline every front end runs, and scan dates), ``correct``
  (``retrack``: a user's corrections re-propagated; ``correctionfile``: their JSON), ``measure``
  (volume, diameters, RECIST), ``evaluate`` (Dice, NSD, CPM@25 against a ground truth),
  ``report`` (tables and figures); ``metrics`` keeps the old names;
* front-end plumbing: ``cancel`` (torch-free cancel token), ``protocol`` (the worker's messages
  and mask files), ``runner`` (in-process and worker-process runners), ``worker`` (the worker),
  ``remote`` (``RemoteRunner``: the same on a server; standard library and numpy only);
* server (``lesionlocator serve``): ``serverapi`` (the HTTP API and its image and mask
  encodings), ``serverjobs`` (keys, models by name, image cache, job queue over the devices),
  ``server`` (the FastAPI/uvicorn layer), ``servecommand`` (the command's options and checks),
  ``serverclient`` (``segment``/``track --server``);
* DICOM: ``dicomseries`` (series folders in), ``dicomseg``, ``dicomsr``, ``dicomresults`` (SEG
  and TID 1500 SR out), ``lesionstyle`` (lesion names and colours shared with Slicer);
* I/O and models: ``files`` (atomic writes), ``zoo`` (the model cache, download and install),
  ``download`` (HTTP), ``archives`` (safe unpacking);
* front ends: ``cli`` (the ``lesionlocator`` command; ``inputs``: everything it is given, checked
  before work starts; ``outputs``: output folders, lock, per-case manifests), ``demo``;
* ``training/``: training and synthetic data (not shipped with the Slicer extension).
"""
__version__ = "0.1.0"
