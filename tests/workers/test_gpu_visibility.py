"""GPU ordering for CUDA IPC across GPUs (workers/gpu_visibility.py). The GPU path itself runs on
the lent H100s (benchmarks/README.md); here: the ordering rules and the no-GPU / no-NOSET cases."""

import pytest

from workers import gpu_visibility as gv


def test_assigned_gpu_comes_first_and_others_stay_visible():
    assert gv.assigned_first(["1"], ["0", "1"]) == ["1", "0"]
    assert gv.assigned_first(["0"], ["0", "1", "2", "3"]) == ["0", "1", "2", "3"]
    assert gv.assigned_first(["6", "4"], ["4", "5", "6", "7"]) == ["6", "4", "5", "7"]
    # a raylet started with CUDA_VISIBLE_DEVICES=2,3 assigns from those ids
    assert gv.assigned_first(["3"], ["2", "3"]) == ["3", "2"]
    # fractional GPUs: two workers on GPU 0 both see it first
    assert gv.assigned_first(["0", "0"], ["0", "1"]) == ["0", "1"]


def test_bad_assignments_are_errors():
    with pytest.raises(ValueError, match="no GPU"):
        gv.assigned_first([], ["0"])
    with pytest.raises(ValueError, match=r"\['5'\] are not among"):
        gv.assigned_first(["5"], ["0", "1"])


def test_without_noset_visibility_is_left_to_ray(monkeypatch):
    monkeypatch.delenv(gv.NOSET_ENV, raising=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert gv.show_node_gpus_assigned_first() is None
    import os

    assert os.environ["CUDA_VISIBLE_DEVICES"] == "1"


def test_node_ids_come_from_the_inherited_list(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert gv.node_gpu_ids() == ["2", "3"]
