import numpy as np

from radguard.regions import mask_boxes


def test_empty_mask_has_no_boxes():
    assert mask_boxes(np.zeros((5, 5), dtype=bool)) == []


def test_diagonal_cells_join_and_largest_comes_first():
    mask = np.zeros((6, 8), dtype=bool)
    mask[0, 0] = True
    mask[1, 1] = True  # diagonal neighbour: same component
    mask[3:6, 4:8] = True  # 12 cells: largest
    assert mask_boxes(mask) == [[4, 3, 8, 6], [0, 0, 2, 2]]


def test_cell_size_scales_boxes_to_pixels():
    mask = np.zeros((4, 4), dtype=bool)
    mask[1, 2] = True
    assert mask_boxes(mask, cell=16) == [[32, 16, 48, 32]]
