"""BIDS metadata of the simulated datasets: what the BIDS validator and a reader expect beside
the data, every value true of the simulation.

The MEG files are FIF (mne-bids' only writable format), which makes mne-bids describe every
recording as an Elekta one in Neuromag coordinates; :func:`describe_meg_run` restores the
simulated system's manufacturer, model and (for CTF) coordinate system. Recommended fields that
have no meaning for a simulated recording are left out; :data:`NOT_APPLICABLE` lists the
validator warnings that this leaves, with the reason, and the test suite checks that nothing
else is reported (``tests/test_bids_validator.py``).
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path

import mne
import mne_bids
import numpy as np

TASK_DESCRIPTION = (
    "Rapid serial presentation of natural images (random crops of photographs: one concept per "
    "photo, its exemplars different crops). Train exemplars are shown once, test exemplars "
    "repeatedly. Simulated recording: no participant took part."
)
INSTRUCTIONS = "None: the participant is simulated (passive viewing, fixation assumed)."
AUTHORS = ["neurorecon sample generator", "neurorecon developers"]
LICENSE = "CC0"
#: descriptions of the event columns that both modalities write
EVENT_COLUMNS = {
    "trial_type": "train: exemplar shown once; test: exemplar shown repeatedly",
    "stim_file": "Image shown, relative to the stimuli/ folder",
}

#: sensor system (``sample.meg.system``) -> (Manufacturer, ManufacturersModelName,
#: BIDS MEG coordinate system, head-coil frequencies in Hz)
MEG_SYSTEMS: dict[str, tuple[str, str, str, list[float]]] = {
    "ctf275": ("CTF", "CTF-275", "CTF", [1470.0, 1530.0, 1590.0]),
    "ctf151": ("CTF", "CTF-151", "CTF", [1470.0, 1530.0, 1590.0]),
    "neuromag": ("Elekta", "Elekta Neuromag VectorView 306", "ElektaNeuromag",
                 [293.0, 307.0, 314.0, 321.0]),
}

#: nominal acquisition of the simulated BOLD contrast (a 3 T gradient-echo EPI at the config's
#: TR; the flip angle is the Ernst angle of grey matter, T1 = 1.33 s, at TR 1.5 s;
#: every voxel of a volume is sampled at once, as in a 3D acquisition: no slice timing)
FMRI_ACQUISITION = {
    "MagneticFieldStrength": 3.0,
    "EchoTime": 0.03,
    "FlipAngle": 71.0,
    "MRAcquisitionType": "3D",
    "PulseSequenceType": "Gradient Echo EPI",
    "ScanningSequence": "EP",
    "SequenceVariant": "NONE",
}

#: validator warnings (code, sub-code) left on the simulated datasets, with why they cannot be
#: avoided: the fields describe a real site, device, scan protocol or participant
NOT_APPLICABLE: dict[tuple[str, str | None], str] = {
    **{("SIDECAR_KEY_RECOMMENDED", key): "no institution ran a simulation"
       for key in ("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName")},
    ("SIDECAR_KEY_RECOMMENDED", "DeviceSerialNumber"): "no device",
    ("SIDECAR_KEY_RECOMMENDED", "StationName"): "no scanner",
    ("SIDECAR_KEY_RECOMMENDED", "AssociatedEmptyRoom"): "no empty-room recording is simulated",
    ("SIDECAR_KEY_RECOMMENDED", "CogAtlasID"): "no Cognitive Atlas entry is claimed",
    ("SIDECAR_KEY_RECOMMENDED", "CogPOID"): "no CogPO entry is claimed",
    **{("SIDECAR_KEY_RECOMMENDED", key): "MR hardware and sequence details are not simulated"
       for key in ("ReceiveCoilName", "ReceiveCoilActiveElements", "MatrixCoilMode",
                   "CoilCombinationMethod", "SequenceName", "PulseSequenceDetails",
                   "NonlinearGradientCorrection", "PhaseEncodingDirection",
                   "TotalReadoutTime", "DwellTime")},
    ("JSON_KEY_RECOMMENDED", "HEDVersion"): "events carry no HED annotations (mne-bids reads "
    "them only with hedtools installed, and warns on every read without it)",
}


def software_version() -> str:
    return f"neurorecon {version('neurorecon')}"


def events_sidecar() -> dict:
    """The events sidecar's entries common to both modalities: column descriptions and
    ``StimulusPresentation``."""
    return {
        **{column: {"Description": text} for column, text in EVENT_COLUMNS.items()},
        "StimulusPresentation": {"SoftwareName": "neurorecon sample generator",
                                 "SoftwareVersion": software_version()},
    }


def describe_dataset(root: Path, *, name: str, seed: int, params: dict) -> None:
    """``dataset_description.json`` (with provenance) and ``README`` of a simulated dataset.

    How it was generated (``seed`` and the simulator's ``params``) goes to
    ``GeneratedBy[0].Description`` and to the README.
    """
    description = (f"Simulated with neurorecon sample (seed {seed}); parameters: "
                   f"{json.dumps(params, sort_keys=True)}")
    mne_bids.make_dataset_description(
        path=root, name=name, dataset_type="raw", data_license=LICENSE, authors=AUTHORS,
        generated_by=[{"Name": "neurorecon", "Version": version("neurorecon"),
                       "Description": description}],
        source_datasets=[{"URL": "https://scikit-image.org/docs/stable/api/skimage.data.html"},
                         {"URL": "https://scikit-learn.org/stable/datasets/loading_other_"
                          "datasets.html#sample-images"}],
        overwrite=True, verbose=False)
    (root / "README").write_text(
        f"# {name}\n\nA simulated dataset written by `neurorecon sample`: no participant took "
        "part and no scanner was used. The physics (sensor geometry, forward model, noise, "
        "haemodynamics) are simulated; the stimuli are real photographs that ship inside "
        "scikit-image, scikit-learn and matplotlib (`stimuli/`).\n\n"
        f"## Task\n\n{TASK_DESCRIPTION}\n\n## Generation\n\n{description}\n")


def meg_digitization(rng: np.random.Generator, system: str) -> mne.channels.DigMontage:
    """Fiducials and head-coil positions (head frame) of a simulated subject.

    The fiducials are symmetric about the head frame's origin (ears on the x axis, nasion on
    the y axis), scaled per subject by ``rng``; CTF systems have their three coils on the
    fiducials, Neuromag systems four coils on the scalp.
    """
    scale = float(np.clip(rng.normal(1.0, 0.04), 0.9, 1.1))
    nasion, lpa, rpa = (np.array(p) * scale for p in
                        ([0.0, 0.095, 0.0], [-0.075, 0.0, 0.0], [0.075, 0.0, 0.0]))
    if MEG_SYSTEMS[system][2] == "CTF":
        hpi = np.stack([nasion, lpa, rpa])
    else:
        hpi = scale * np.array([[-0.04, 0.07, 0.05], [0.04, 0.07, 0.05],
                                [-0.06, -0.02, 0.06], [0.06, -0.02, 0.06]])
    return mne.channels.make_dig_montage(nasion=nasion, lpa=lpa, rpa=rpa, hpi=hpi,
                                         coord_frame="head")


def describe_meg_run(bids_path: mne_bids.BIDSPath, system: str) -> None:
    """Correct and complete the sidecars that mne-bids wrote for one simulated run."""
    manufacturer, model, coords, coil_freqs = MEG_SYSTEMS[system]
    sidecar = bids_path.copy().update(suffix="meg", extension=".json")
    mne_bids.update_sidecar_json(sidecar, {
        "Manufacturer": manufacturer, "ManufacturersModelName": model,
        "SoftwareVersions": software_version(), "TaskDescription": TASK_DESCRIPTION,
        "Instructions": INSTRUCTIONS, "DewarPosition": "upright",
        "HeadCoilFrequency": coil_freqs, "MaxMovement": 0.0,
        "SubjectArtefactDescription": "n/a", "HardwareFilters": "n/a",
        "ECOGChannelCount": 0, "SEEGChannelCount": 0,
    }, verbose=False)
    mne_bids.update_sidecar_json(bids_path.copy().update(suffix="events", extension=".json"),
                                 events_sidecar(), verbose=False)
    coordsystem = bids_path.copy().update(suffix="coordsystem", extension=".json", task=None,
                                          run=None)
    _coordinates(coordsystem.fpath, ctf=coords == "CTF")


def _coordinates(path: Path, *, ctf: bool) -> None:
    """Rewrite a coordsystem.json that mne-bids wrote: head coils apart from the anatomical
    landmarks (mne-bids lists both under each), and for CTF systems in the CTF head frame.

    With fiducials symmetric about the origin (:func:`meg_digitization`), the CTF frame (x to
    the nasion, y to the left ear) shares the Neuromag frame's origin and is rotated by 90
    degrees about z: ``(x, y, z) -> (y, -x, z)``.
    """
    meta = json.loads(path.read_text())
    points = meta["AnatomicalLandmarkCoordinates"]
    if ctf:
        points = {name: [p[1] + 0.0, -p[0] + 0.0, p[2] + 0.0] for name, p in points.items()}
        for key in ("MEGCoordinateSystem", "HeadCoilCoordinateSystem",
                    "AnatomicalLandmarkCoordinateSystem"):
            meta[key] = "CTF"
        meta["MEGCoordinateSystemDescription"] = (
            "CTF head coordinates: origin midway between the ears, x to the nasion, y to the "
            "left ear, z up. The FIF files keep MNE's device-to-head transform.")
    landmarks = ("NAS", "LPA", "RPA")
    meta["HeadCoilCoordinates"] = {k: p for k, p in points.items() if k not in landmarks}
    meta["AnatomicalLandmarkCoordinates"] = {k: points[k] for k in landmarks}
    path.write_text(json.dumps(meta, indent=4))


def fmri_sidecar(*, tr: float, task: str) -> dict:
    """The ``*_bold.json`` sidecar of a simulated run."""
    return {
        "TaskName": task, "RepetitionTime": tr, "SkullStripped": True,
        "Manufacturer": "neurorecon (simulated)", "ManufacturersModelName": "neurorecon BOLD "
        "simulator", "SoftwareVersions": software_version(), **FMRI_ACQUISITION,
        "TaskDescription": TASK_DESCRIPTION, "Instructions": INSTRUCTIONS,
        "Description": "simulated BOLD in MNI152 space (neurorecon sample dataset); the "
        "acquisition fields are the nominal contrast the simulation stands for",
    }

