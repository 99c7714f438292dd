from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import pytest

from edge_agent.synthetic import (
    DEFECT_CLASSES,
    PartGenerator,
    SyntheticPart,
    next_index,
    parse_part_id,
)

pytestmark = pytest.mark.unit


def test_same_seed_and_index_give_identical_parts() -> None:
    first = PartGenerator(seed=11).part(42)
    second = PartGenerator(seed=11).part(42)
    assert first.part_id == second.part_id == "syn-11-00000042"
    assert first.defect == second.defect
    assert first.image.tobytes() == second.image.tobytes()


def test_parts_are_random_access_regardless_of_order() -> None:
    generator = PartGenerator(seed=5)
    streamed = list(islice(iter(generator), 6))
    assert [p.index for p in streamed] == list(range(6))
    assert generator.part(5).image.tobytes() == streamed[5].image.tobytes()


def test_different_seeds_and_indices_differ() -> None:
    a = PartGenerator(seed=1).part(0).image
    b = PartGenerator(seed=2).part(0).image
    c = PartGenerator(seed=1).part(1).image
    assert not np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_image_is_bgr_uint8_of_requested_size() -> None:
    part = PartGenerator(seed=3, size=96).part(0)
    assert part.image.shape == (96, 96, 3)
    assert part.image.dtype == np.uint8
    # A bright part on a dark belt: the frame uses most of the grey range.
    assert int(part.image.max()) - int(part.image.min()) > 80


def test_defect_rate_is_respected_and_every_class_occurs() -> None:
    parts = [PartGenerator(seed=7, defect_rate=0.3).part(i) for i in range(2000)]
    defective = [p for p in parts if p.is_defective]
    assert 0.26 < len(defective) / len(parts) < 0.34
    counts = Counter(p.defect for p in defective)
    assert set(counts) == set(DEFECT_CLASSES)
    assert min(counts.values()) > 0.1 * len(defective)


def test_defect_rate_extremes_and_class_subset() -> None:
    assert not any(PartGenerator(seed=1, defect_rate=0.0).part(i).is_defective for i in range(50))
    only_cracks = PartGenerator(seed=1, defect_rate=1.0, defect_classes=("crack",))
    assert {only_cracks.part(i).defect for i in range(50)} == {"crack"}


def test_good_and_defective_parts_share_the_look() -> None:
    part = SyntheticPart("syn-0-00000000", 0, np.zeros((2, 2, 3), np.uint8), None)
    assert not part.is_defective


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"seed": -1}, "seed"),
        ({"seed": 1.5}, "seed"),
        ({"seed": 1, "defect_rate": 1.2}, "defect_rate"),
        ({"seed": 1, "defect_rate": -0.1}, "defect_rate"),
        ({"seed": 1, "size": 8}, "size"),
        ({"seed": 1, "defect_classes": ("dent",)}, "defect_classes"),
        ({"seed": 1, "defect_classes": ("pit", "pit")}, "defect_classes"),
        ({"seed": 1, "defect_classes": ()}, "defect_classes"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict[str, object], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        PartGenerator(**kwargs)  # type: ignore[arg-type]


def test_negative_index_raises() -> None:
    with pytest.raises(ValueError, match="index"):
        PartGenerator(seed=1).part(-1)


def test_part_id_round_trip() -> None:
    part = PartGenerator(seed=123).part(98765)
    assert parse_part_id(part.part_id) == (123, 98765)
    assert parse_part_id("syn-0-123456789") == (0, 123456789)


@pytest.mark.parametrize(
    "foreign", ["cam-1-00000001", "syn-1-12", "syn--1-00000001", "syn-1-0000000x", ""]
)
def test_parse_part_id_rejects_foreign_ids(foreign: str) -> None:
    with pytest.raises(ValueError, match="synthetic part id"):
        parse_part_id(foreign)


def test_next_index_goes_past_the_highest_id_of_the_seed() -> None:
    assert next_index([], 7) == 0
    ids = ["syn-7-00000003", "syn-7-00000120", "syn-8-00009999", "press-01-a-1", "syn-7-x"]
    assert next_index(ids, 7) == 121
    assert next_index(ids, 8) == 10_000
    assert next_index(ids, 9) == 0


def test_a_parts_defect_is_known_without_drawing_its_image() -> None:
    # The simulated operators and the line summary ask for the truth of thousands of parts:
    # it must be the same answer as the part's own, for every seed, rate and class set.
    for generator in (
        PartGenerator(seed=7, defect_rate=0.3),
        PartGenerator(seed=2, defect_rate=0.9, defect_classes=("scratch", "crack")),
        PartGenerator(seed=0, defect_rate=0.0),
    ):
        truths = [generator.defect(i) for i in range(300)]
        assert truths == [generator.part(i).defect for i in range(300)]
    assert None in truths and len(set(PartGenerator(seed=7).defect(i) for i in range(300))) > 2
    with pytest.raises(ValueError, match="index must be a non-negative int"):
        PartGenerator(seed=1).defect(-1)
