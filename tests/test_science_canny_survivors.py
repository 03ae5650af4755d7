"""Edge-map inputs pinned where the mutation run (benchmarks/results/mutation/report.md) showed no
test would notice a change: how `to_uint8_rgb` turns each accepted image type into HxWx3 uint8
pixels (layout, rounding, clipping, grey to RGB) and which inputs it refuses, with what message.
Expected pixels are written out by hand."""

from __future__ import annotations

import cv2
import numpy as np
import PIL.Image
import pytest
import torch

from ccp.evaluation.canny import canny_edges, edge_map_image, to_uint8_rgb


def _assert_pixels(got, expected):
    expected = np.asarray(expected, dtype=np.uint8)
    assert isinstance(got, np.ndarray) and got.dtype == np.uint8
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert got.flags["C_CONTIGUOUS"]


def test_floats_are_scaled_by_255_rounded_to_nearest_and_clipped():
    # 0.5 * 255 = 127.5 rounds to even (128); 0.2 * 255 = 51; 0.8 * 255 = 204; 0.002 * 255 = 0.51 rounds up
    # to 1 and 0.0019 * 255 = 0.48 down to 0; 1.3 and -0.2 clip
    grey = np.array([[0.0, 0.5, 1.0], [0.2, 0.002, 1.3], [-0.2, 0.8, 0.0019]], dtype=np.float64)
    expected = np.array([[0, 128, 255], [51, 1, 255], [0, 204, 0]])
    _assert_pixels(to_uint8_rgb(grey), np.repeat(expected[:, :, None], 3, axis=-1))


def test_channel_first_tensor_is_moved_to_channel_last():
    chw = torch.zeros(3, 2, 4)
    chw[0, 0, 1] = 1.0  # red at row 0, column 1
    chw[1, 1, 3] = 1.0  # green at row 1, column 3
    chw[2] = 0.2  # blue everywhere: 51
    expected = np.zeros((2, 4, 3), dtype=np.uint8)
    expected[0, 1, 0] = 255
    expected[1, 3, 1] = 255
    expected[:, :, 2] = 51
    _assert_pixels(to_uint8_rgb(chw), expected)


def test_channel_last_tensor_keeps_its_layout():
    hwc = torch.zeros(2, 4, 3)
    hwc[1, 2] = torch.tensor([1.0, 0.2, 0.0])
    expected = np.zeros((2, 4, 3), dtype=np.uint8)
    expected[1, 2] = [255, 51, 0]
    _assert_pixels(to_uint8_rgb(hwc), expected)


def test_a_three_row_channel_last_tensor_is_not_transposed():
    # [3, 4, 3]: the first axis could be channels, but the last one is 3 as well, so it is read as HxWx3
    hwc = torch.zeros(3, 4, 3)
    hwc[2, 0] = torch.tensor([1.0, 0.0, 0.0])
    expected = np.zeros((3, 4, 3), dtype=np.uint8)
    expected[2, 0, 0] = 255
    _assert_pixels(to_uint8_rgb(hwc), expected)


def test_single_channel_tensor_becomes_grey_rgb():
    one = torch.tensor([[[0.0, 1.0], [0.2, 0.5]]])  # [1, 2, 2]
    expected = np.repeat(np.array([[0, 255], [51, 128]])[:, :, None], 3, axis=-1)
    _assert_pixels(to_uint8_rgb(one), expected)


def test_bfloat16_tensors_that_require_grad_are_read_too():
    image = torch.full((3, 2, 2), 0.2, dtype=torch.bfloat16, requires_grad=True)
    # bfloat16 0.2 is 0.2001953125; x 255 = 51.05 -> 51
    _assert_pixels(to_uint8_rgb(image), np.full((2, 2, 3), 51))


def test_uint8_arrays_are_used_as_they_are_and_grey_becomes_rgb():
    rgb = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 10
    _assert_pixels(to_uint8_rgb(rgb), rgb)
    grey = np.array([[7, 200], [0, 255]], dtype=np.uint8)
    _assert_pixels(to_uint8_rgb(grey), np.stack([grey, grey, grey], axis=-1))
    _assert_pixels(to_uint8_rgb(grey[:, :, None]), np.stack([grey, grey, grey], axis=-1))


def test_pil_images_of_any_mode_become_rgb():
    grey = PIL.Image.fromarray(np.array([[10, 20], [30, 40]], dtype=np.uint8), mode="L")
    _assert_pixels(to_uint8_rgb(grey), np.repeat(np.array([[10, 20], [30, 40]])[:, :, None], 3, axis=-1))
    rgba = np.zeros((1, 2, 4), dtype=np.uint8)
    rgba[0, 1] = [1, 2, 3, 4]
    _assert_pixels(to_uint8_rgb(PIL.Image.fromarray(rgba, mode="RGBA")), [[[0, 0, 0], [1, 2, 3]]])


def test_integer_pixels_other_than_uint8_are_refused_naming_the_dtype():
    with pytest.raises(TypeError, match=r"^expected uint8 or float pixels, got int32$"):
        to_uint8_rgb(np.zeros((2, 2, 3), dtype=np.int32))


@pytest.mark.parametrize("shape", [(2, 2, 4), (2, 2, 2), (1, 2, 2, 3), (4,)])
def test_other_shapes_are_refused_naming_the_shape(shape):
    expected = rf"^expected an HxW, HxWx1 or HxWx3 image, got shape \({', '.join(map(str, shape))},?\)$"
    with pytest.raises(ValueError, match=expected):
        to_uint8_rgb(np.zeros(shape, dtype=np.uint8))


# --- canny_edges: OpenCV's Canny with the thresholds as given --------------------------------------
def _blurred_noise(seed=0, size=32):
    rng = np.random.default_rng(seed)
    noise = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return cv2.GaussianBlur(noise, (7, 7), 2.5)


def test_canny_edges_is_opencv_canny_with_both_thresholds():
    image = _blurred_noise()
    got = canny_edges(image, 70, 140)
    np.testing.assert_array_equal(got, cv2.Canny(image, 70, 140))
    # both thresholds matter on this image (152 edge pixels, 192 with low 0, 287 with high 70)
    assert not np.array_equal(got, cv2.Canny(image, 0, 140))
    assert not np.array_equal(got, cv2.Canny(image, 70, 70))
    assert set(np.unique(got)) == {0, 255}


def test_canny_edges_reads_float_tensors_as_their_rounded_pixels():
    image = _blurred_noise(seed=1)
    as_tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0
    np.testing.assert_array_equal(canny_edges(as_tensor, 70, 140), cv2.Canny(image, 70, 140))


@pytest.mark.parametrize("low, high", [(0, 0), (0, 90), (50, 50)])
def test_thresholds_from_zero_and_equal_ones_are_accepted(low, high):
    image = _blurred_noise(seed=2)
    np.testing.assert_array_equal(canny_edges(image, low, high), cv2.Canny(image, low, high))


@pytest.mark.parametrize("low, high", [(-1, 10), (60, 59)])
def test_thresholds_out_of_order_are_refused_naming_them(low, high):
    with pytest.raises(ValueError, match=rf"^canny thresholds must satisfy 0 <= low <= high, got {low}, {high}$"):
        canny_edges(_blurred_noise(), low, high)


def test_edge_map_image_is_white_edges_on_black_and_refuses_other_shapes():
    edges = np.array([[0, 255, 0], [0, 0, 7]], dtype=np.uint8)
    image = edge_map_image(edges)
    assert image.mode == "RGB"
    expected = np.zeros((2, 3, 3), dtype=np.uint8)
    expected[0, 1] = 255
    expected[1, 2] = 255
    np.testing.assert_array_equal(np.asarray(image), expected)
    with pytest.raises(ValueError, match=r"^expected an \[H, W\] edge map, got shape \(2, 3, 3\)$"):
        edge_map_image(np.zeros((2, 3, 3)))
