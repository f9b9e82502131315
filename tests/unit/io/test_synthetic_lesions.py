"""The many-small-lesions synthetic dataset: layout, per-case spacing, many lesions of varied size, determinism."""

from __future__ import annotations

import json

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.image import read_image
from medseg.io.synthetic import generate_synthetic_dataset
from medseg.io.synthetic_lesions import LESION_LABELS, generate_lesion_dataset
from medseg.postprocessing.operations import label_components


def test_cases_hold_many_lesions_of_varied_size_at_their_own_spacing(tmp_path):
    root = generate_lesion_dataset(tmp_path / "d", num_cases=4, shape=(24, 40, 40), z_spacings=(1.0, 2.0))
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "lesion"} and meta["numTraining"] == 4
    spacings, counts, volumes = set(), [], []
    for i in range(4):
        image, geo = read_image(root / "imagesTr" / f"lesion_{i:03d}.nii.gz")
        label, label_geo = read_image(root / "labelsTr" / f"lesion_{i:03d}.nii.gz")
        assert label_geo == geo and image.shape == label.shape == (24, 40, 40)
        assert set(np.unique(label)) <= set(LESION_LABELS.values())
        assert image[label == 1].mean() > image[(label == 0) & (image > 0)].mean()  # lesions are brighter
        spacings.add(geo.spacing)
        sizes = label_components(label == 1)[1][1:]
        counts.append(sizes.size)
        volumes.extend(sizes * float(np.prod(geo.spacing)))
    assert spacings <= {(1.0, 1.0, 1.0), (2.0, 1.0, 1.0)}
    assert min(counts) >= 2 and max(volumes) > 10 * min(volumes)


def test_lesion_dataset_is_deterministic_and_refuses_other_datasets(tmp_path):
    a = generate_lesion_dataset(tmp_path / "a", num_cases=2, shape=(16, 24, 24), seed=3)
    b = generate_lesion_dataset(tmp_path / "b", num_cases=2, shape=(16, 24, 24), seed=3)
    for name in ("imagesTr/lesion_001.nii.gz", "labelsTr/lesion_001.nii.gz"):
        np.testing.assert_array_equal(read_image(a / name)[0], read_image(b / name)[0])
    other = generate_synthetic_dataset(tmp_path / "other", num_cases=1)
    with pytest.raises(MedsegError, match="refusing to overwrite"):
        generate_lesion_dataset(other, num_cases=1, shape=(16, 24, 24))
