"""How a label of ``dataset.json`` is described in DICOM output: a SNOMED CT category and type, and a colour.

:func:`describe_label` looks a label's name up in a small table of common structures (case, spaces, ``-`` and ``_``
ignored; a side such as ``left``/``right``/``_l``/``_r`` is dropped for the look-up, so ``kidney_left`` and
``Right Kidney`` are both coded as SNOMED CT *Kidney*): organs get the category *Anatomical Structure*, lesions
and tumours *Morphologically Abnormal Structure*. A name not in the table gets the generic category and type
*Tissue* (SNOMED CT 85756007). The codes are those of pydicom's DICOM code dictionary (CID 7150 categories and the
SCT scheme), so no code is spelled by hand here.

Colours are RGB ``0..255``: the table's colour for a known structure, else a fixed palette indexed by the label
id (so a label keeps its colour from case to case and between the SEG and RTSTRUCT outputs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = ["LabelDescription", "describe_label"]

ANATOMY = codes.cid7150.AnatomicalStructure
ABNORMAL = codes.cid7150.MorphologicallyAbnormalStructure
TISSUE = codes.cid7150.Tissue

#: normalised name -> (category, type, RGB colour)
KNOWN: dict[str, tuple[Code, Code, tuple[int, int, int]]] = {
    "liver": (ANATOMY, codes.SCT.Liver, (221, 130, 101)),
    "spleen": (ANATOMY, codes.SCT.Spleen, (157, 108, 162)),
    "kidney": (ANATOMY, codes.SCT.Kidney, (185, 102, 83)),
    "pancreas": (ANATOMY, codes.SCT.Pancreas, (249, 180, 111)),
    "heart": (ANATOMY, codes.SCT.Heart, (206, 110, 84)),
    "lung": (ANATOMY, codes.SCT.Lung, (197, 165, 145)),
    "stomach": (ANATOMY, codes.SCT.Stomach, (216, 132, 105)),
    "gallbladder": (ANATOMY, codes.SCT.Gallbladder, (139, 150, 98)),
    "bladder": (ANATOMY, codes.SCT.Bladder, (222, 198, 101)),
    "urinarybladder": (ANATOMY, codes.SCT.Bladder, (222, 198, 101)),
    "brain": (ANATOMY, codes.SCT.Brain, (250, 250, 225)),
    "aorta": (ANATOMY, codes.SCT.Aorta, (224, 97, 76)),
    "inferiorvenacava": (ANATOMY, codes.SCT.InferiorVenaCava, (0, 151, 206)),
    "esophagus": (ANATOMY, codes.SCT.Esophagus, (211, 171, 143)),
    "duodenum": (ANATOMY, codes.SCT.Duodenum, (255, 253, 229)),
    "colon": (ANATOMY, codes.SCT.Colon, (204, 168, 143)),
    "adrenalgland": (ANATOMY, codes.SCT.AdrenalGland, (244, 214, 49)),
    "prostate": (ANATOMY, codes.SCT.Prostate, (230, 158, 140)),
    "hippocampus": (ANATOMY, codes.SCT.Hippocampus, (220, 216, 20)),
    "bone": (TISSUE, codes.SCT.Bone, (241, 214, 145)),
    "tumor": (ABNORMAL, codes.SCT.Neoplasm, (255, 0, 0)),
    "tumour": (ABNORMAL, codes.SCT.Neoplasm, (255, 0, 0)),
    "neoplasm": (ABNORMAL, codes.SCT.Neoplasm, (255, 0, 0)),
    "lesion": (ABNORMAL, codes.SCT.Lesion, (255, 64, 0)),
    "mass": (ABNORMAL, codes.SCT.Mass, (255, 96, 0)),
    "edema": (ABNORMAL, codes.SCT.Edema, (0, 200, 255)),
    "oedema": (ABNORMAL, codes.SCT.Edema, (0, 200, 255)),
}

#: Colours of labels whose name is not in :data:`KNOWN`, by label id (cycled).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
    (0, 128, 128),
    (220, 190, 255),
)

_SIDES = re.compile(r"^(left|right|l|r)_|_(left|right|l|r)$")


@dataclass(frozen=True)
class LabelDescription:
    """A label as DICOM output describes it.

    Attributes:
        label_id: the label's id in the label map.
        name: its name (from ``dataset.json``).
        category: SNOMED CT segmented property category (CID 7150).
        type: SNOMED CT segmented property type.
        rgb: display colour, RGB ``0..255``.
        known: whether the name was found in :data:`KNOWN` (else the codes are the generic *Tissue*).
    """

    label_id: int
    name: str
    category: Code
    type: Code
    rgb: tuple[int, int, int]
    known: bool


def describe_label(label_id: int, name: str) -> LabelDescription:
    """The codes and colour of label ``label_id`` named ``name`` (see the module docstring for the rules)."""
    key = _normalise(name)
    entry = KNOWN.get(key) or KNOWN.get(_SIDES.sub("", key).replace("_", ""))
    if entry is not None:
        category, kind, rgb = entry
        return LabelDescription(label_id, name, category, kind, rgb, True)
    rgb = PALETTE[(label_id - 1) % len(PALETTE)]
    return LabelDescription(label_id, name, TISSUE, codes.SCT.Tissue, rgb, False)


def _normalise(name: str) -> str:
    """Lower case with words joined by ``_`` (``"Right Kidney"`` -> ``"right_kidney"``); exact table keys
    have no separators, so ``"Inferior vena cava"`` finds ``"inferiorvenacava"`` after the second look-up."""
    return re.sub(r"[\s\-_]+", "_", name.strip().lower()).strip("_")
