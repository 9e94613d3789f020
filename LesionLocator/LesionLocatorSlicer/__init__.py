"""The LesionLocator Slicer module's code, one job per file (``LesionLocator.py`` beside this
package holds only the module class, a thin widget shell and the self-test entry):

* ``logic.py``: the Logic facade (``LesionLocatorLogic``): segment, refine, track, undo, export,
  models; console calls block, the GUI runs the same operations as jobs.
* ``reviewlogic.py``: the Logic's review of a tracking run (``ReviewLogic``, part of
  ``LesionLocatorLogic``): cells, showing a lesion, corrections with one undo step each.
* ``scene.py``: scene conversion, the one place RAS meets LPS (parent transforms included):
  volume -> library Image, markups -> prompts, segment <-> mask, study dates.
* ``results.py``: result nodes: find or create, lesion IDs, tags, colours, undo records.
* ``review.py``: the review of the last tracking run (Qt-free): cells (lesion x scan: status,
  volume, reviewed), the corrections so far (each correction request carries all of them on the
  first run), undo records of corrections.
* ``trackoutputs.py``: tracking outputs: per-timepoint segmentations, sequences and browser (no CT
  copies), lesion table, volume plot, export to files.
* ``dicomexport.py``: export to DICOM: each timepoint's lesions as a DICOM SEG and SR on the series
  its volume was loaded from (``DICOM.instanceUIDs``), written by the library.
* ``models.py``: model choice and download through the library's zoo.
* ``remotesettings.py``: Remote mode's settings (server URL, model name, API key) in the user's
  settings and keyring, never in the scene; the Logic runs on the server with
  ``useRemoteServer`` (:class:`LesionLocatorLib.remote.RemoteRunner`).
* ``dependencies.py``: the Python packages the module needs, and installing them without
  replacing the PyTorch extension's torch.
* ``jobs.py``: long work off the GUI thread (prepare on the main thread, work on a background
  thread, commit on the main thread), polled by a timer.
* ``interaction.py``: click and box interaction as Slicer's markups widgets deliver it, queued.
* ``widget.py``: the module panel (Qt): .ui wiring, parameter node, shortcuts, messages.
* ``selftest.py``: the self-test cases.
"""
