import numpy as np

from e3pruner.plots import plot_removed_layers, removed_share


def test_removed_share_counts_each_seed_once():
    share = removed_share([[1, 2, 3], [2, 3, 5], [3, 4, 5]], 7)
    np.testing.assert_allclose(share, [0, 1 / 3, 2 / 3, 1, 1 / 3, 2 / 3, 0])
    np.testing.assert_array_equal(removed_share([0, 6], 7), [1, 0, 0, 0, 0, 0, 1])


def test_plot_removed_layers_takes_single_and_per_seed_masks(tmp_path):
    path = plot_removed_layers({"a": [0, 1], "b": [[1, 2], [2, 3]]}, 5, tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
