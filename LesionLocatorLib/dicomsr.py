"""DICOM SR TID 1500 (Measurement Report) of one timepoint: per lesion its tracking identity,
status and measurements, referencing its segment of that timepoint's SEG.

One measurement group per lesion of the study (:func:`build_sr`), in lesion-ID order:

* Tracking Identifier 'Lesion N' (:func:`.lesionstyle.lesion_label`) and the lesion's Tracking
  UID, the same at every timepoint;
* its status as a qualitative evaluation, standard codes only: concept DCM 121052 'Presence of
  property'; 'tracked' -> SCT 52101004 'Present', 'vanished' -> SCT 272519000 'Absent',
  'outside' (the scan does not cover it: not measured) -> DCM 121059 'Presence Undetermined'.
  A row without one of these statuses (e.g. '-') counts as tracked when its volume is above 0,
  else vanished;
* measurements, the numbers of the measurement rows (lesions.csv): SCT 118565006 Volume
  [UCUM ml], SCT 103339001 Long Axis and SCT 103340004 Short Axis [UCUM mm] (the longest axial
  diameter and its perpendicular); tracked and vanished lesions get them (vanished: 0), outside
  lesions none;
* a lesion with voxels in the SEG: a TID 1411 volumetric group referencing its segment (SEG
  instance, segment number, source series); a lesion without (vanished, outside): a TID 1501
  group, identity and status only.

Context: Time Point Context = the timepoint's name, a device observer 'LesionLocator' (a UID
derived from that name (:func:`.dicomresults.derived_uid`), the same in every report), procedure reported LN 25045-6 'CT
unspecified body region', algorithm 'LesionLocator' with the package version. Evidence: the
timepoint's CT instances and its SEG; patient and study come from the CT series.
"""
from __future__ import annotations

SR_SERIES_NUMBER = 902
STATUS_VALUES = {"tracked": ("52101004", "SCT", "Present"), "vanished": ("272519000", "SCT", "Absent"),
                 "outside": ("121059", "DCM", "Presence Undetermined")}
MEASUREMENTS = (("volume_ml", ("118565006", "SCT", "Volume"), ("ml", "UCUM", "milliliter")),
                ("long_axis_mm", ("103339001", "SCT", "Long Axis"), ("mm", "UCUM", "millimeter")),
                ("short_axis_mm", ("103340004", "SCT", "Short Axis"), ("mm", "UCUM", "millimeter")))


def sr_status(row: dict) -> str:
    """'tracked', 'vanished' or 'outside' for a measurement row (see the module docstring)."""
    status = str(row.get("status", ""))
    if status in STATUS_VALUES:
        return status
    return "tracked" if float(row.get("volume_ml") or 0.0) > 0 else "vanished"


def _group(row: dict, tracking_uid: str, timepoint, algorithm, segment):
    """One lesion's measurement group; ``segment``: its ReferencedSegment or None."""
    import highdicom as hd
    from highdicom.sr import CodedConcept
    from pydicom.sr.codedict import codes

    from .lesionstyle import lesion_label

    status = sr_status(row)
    evaluation = hd.sr.QualitativeEvaluation(codes.DCM.PresenceOfProperty, CodedConcept(*STATUS_VALUES[status]))
    measurements = None if status == "outside" else [
        hd.sr.Measurement(name=CodedConcept(*name), value=float(row[key]), unit=CodedConcept(*unit),
                          algorithm_id=algorithm) for key, name, unit in MEASUREMENTS]
    identity = hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=lesion_label(row["lesion_id"]))
    common = dict(tracking_identifier=identity, time_point_context=timepoint, finding_type=codes.SCT.Lesion,
                  algorithm_id=algorithm, measurements=measurements, qualitative_evaluations=[evaluation])
    if segment is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_segment=segment, **common)


def build_sr(series, rows: list, tracking_uids: dict, timepoint: str, seg=None, segments: dict | None = None):
    """The TID 1500 SR (a ``highdicom.sr.Comprehensive3DSR``, not yet saved) of one timepoint.

    ``series``: the timepoint's :class:`~LesionLocatorLib.dicomseries.DicomSeries`; ``rows``:
    the timepoint's measurement rows (:func:`LesionLocatorLib.measure.lesion_measurements`: one
    per lesion, volume ml, axes mm, status); ``tracking_uids``: {lesion id: Tracking UID};
    ``timepoint``: its name (Time Point Context); ``seg``: the timepoint's SEG dataset or None;
    ``segments``: {lesion id: segment number} of the lesions with voxels in ``seg`` (the groups
    that reference a segment). New UIDs are random UUID-derived ('2.25.') UIDs.
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.uid import generate_uid

    from . import __version__
    from .dicomresults import derived_uid

    segments = segments or {}
    algorithm = hd.sr.AlgorithmIdentification(name="LesionLocator", version=__version__)
    context = hd.sr.TimePointContext(time_point=str(timepoint))
    source = hd.sr.SourceSeriesForSegmentation(series.uid)
    groups = []
    for row in sorted(rows, key=lambda r: int(r["lesion_id"])):
        pid = int(row["lesion_id"])
        segment = None
        if seg is not None and pid in segments:
            segment = hd.sr.ReferencedSegment(sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
                                              segment_number=segments[pid], source_series=source)
        groups.append(_group(row, tracking_uids[pid], context, algorithm, segment))
    device = hd.sr.DeviceObserverIdentifyingAttributes(uid=derived_uid("device", "LesionLocator"), name="LesionLocator")
    observer = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    report = hd.sr.MeasurementReport(observation_context=observer, procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    evidence = list(series.datasets) + ([seg] if seg is not None else [])
    return hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report, series_instance_uid=generate_uid(prefix=None),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(prefix=None), instance_number=1,
        manufacturer="LesionLocator", manufacturer_model_name="LesionLocator", software_versions=__version__,
        series_description="LesionLocator measurements", is_complete=True)
