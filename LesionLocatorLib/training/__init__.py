"""Training and synthetic data: the lab side of LesionLocatorLib, not shipped with the Slicer extension.

* :mod:`.train`: train or fine-tune a promptable network (:class:`~.train.TrainOptions`,
  :func:`~.train.train`); writes a model root in the official LesionLocator layout.
* :mod:`.synth`: synthetic lesions and follow-ups in a lesion-free CT (paper supplement, section 7):
  the case pipeline; :mod:`.lesions` places, shapes and colours lesions, :mod:`.followups` makes
  what changes between timepoints (growth, vanishing, image transforms).
* ``demo_model_plan.json``: the build plan of the shipped demo model (datasets, runs, which run
  each model folder holds), read by ``Testing/build_demo_model.py``; run results are in
  ``Testing/benchmarks/results/ledger.csv``.

The command line offers both (``lesionlocator train``, ``lesionlocator synth``). Nothing outside
this package imports it: the inference library and the Slicer module run without it.
"""
