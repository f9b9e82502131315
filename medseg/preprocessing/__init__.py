"""Preprocessing: crop to the nonzero region, normalise, resample to the plan's spacing, cache on disk.

Public API::

    preprocess_case(image, geometry, label, plan, config, case_id) -> (data, seg, CaseProperties)
    preprocess_dataset(ds, plan, work_dir, configs=None, num_workers=1)
    load_case(work_dir, plan, config, case_id) -> (data, seg, CaseProperties)
    list_preprocessed_cases(work_dir, plan, config) -> list[str]
    revert_to_original(values, props, is_seg=False) -> array in the original grid
    export_segmentation(seg, props, label_ids, path)

Arrays: images float32 ``(C, Z, Y, X)``, segmentations ``(Z, Y, X)`` class indices ``0..K-1``.
"""

from __future__ import annotations

from medseg.preprocessing.case import (
    PREPROCESSING_VERSION,
    CaseProperties,
    preprocess_case,
    preprocess_case_arrays,
    preprocessing_fingerprint,
)
from medseg.preprocessing.cropping import bounding_box, crop_to_nonzero, nonzero_mask
from medseg.preprocessing.labels import (
    classes_to_labels,
    label_dtype,
    labels_to_classes,
    locations_to_dict,
    sample_class_locations,
    seg_dtype,
)
from medseg.preprocessing.normalization import normalize, normalize_channel
from medseg.preprocessing.resampling import (
    anisotropic_axis,
    compute_new_shape,
    resample_image,
    resample_probabilities,
    resample_segmentation,
)
from medseg.preprocessing.revert import export_segmentation, revert_to_original
from medseg.preprocessing.storage import (
    list_preprocessed_cases,
    load_case,
    load_case_properties,
    preprocess_dataset,
    preprocessed_folder,
    write_case,
)

__all__ = [
    "PREPROCESSING_VERSION",
    "CaseProperties",
    "anisotropic_axis",
    "bounding_box",
    "classes_to_labels",
    "compute_new_shape",
    "crop_to_nonzero",
    "export_segmentation",
    "label_dtype",
    "labels_to_classes",
    "list_preprocessed_cases",
    "locations_to_dict",
    "load_case",
    "load_case_properties",
    "nonzero_mask",
    "normalize",
    "normalize_channel",
    "preprocess_case",
    "preprocess_case_arrays",
    "preprocess_dataset",
    "preprocessed_folder",
    "preprocessing_fingerprint",
    "resample_image",
    "resample_probabilities",
    "resample_segmentation",
    "revert_to_original",
    "sample_class_locations",
    "seg_dtype",
    "write_case",
]
