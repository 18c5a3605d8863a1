"""What a cluster can ever hold, from its alive nodes and its autoscaler's node types (pure logic;
the tests that start real clusters are in test_rehearsal.py)."""

import math

from lstmgen.capacity import Capacity

HEAD = {"CPU": 4.0, "node:__internal_head__": 1.0, "memory": 1e9}
GPU_NODE = {"CPU": 4.0, "GPU": 1.0}
TYPES = {"gpu_ondemand": {"resources": GPU_NODE, "max_workers": 4}, "gpu_spot": {"resources": GPU_NODE, "max_workers": 12}}


def test_each_worker_must_fit_on_one_node():
    cap = Capacity([HEAD, {"CPU": 1.0, "GPU": 1.0}], None, 0, embedded=True)
    assert cap.fits_now({"CPU": 1}) == 5
    assert cap.fits_now({"CPU": 2, "GPU": 1}) == 0  # the GPU node has one CPU, the head no GPU
    assert cap.fits_ever({"CPU": 1, "GPU": 1}) == 1  # embedded: what exists is all there is


def test_the_autoscaler_limits_bound_what_can_ever_fit():
    cap = Capacity([HEAD], TYPES, max_workers=16, embedded=False)
    assert cap.fits_now({"CPU": 1, "GPU": 1}) == 0
    assert cap.fits_ever({"CPU": 1, "GPU": 1}) == 16
    assert Capacity([HEAD], TYPES, max_workers=6, embedded=False).fits_ever({"CPU": 1, "GPU": 1}) == 6  # global cap
    assert cap.fits_ever({"CPU": 1, "TPU": 1}) == 0  # a resource no node type offers
    assert cap.fits_ever({"CPU": 1}) == 4 + 16 * 4
    assert "gpu_spot up to 12" in cap.describe()


def test_unknown_limits_never_refuse():
    assert Capacity([HEAD], None, 0, embedded=False).fits_ever({"GPU": 1}) == math.inf  # an autoscaler we cannot read
    undeclared = {"gpu": {"resources": {}, "max_workers": 2}}  # resources detected by Ray only at launch
    assert Capacity([HEAD], undeclared, 2, embedded=False).fits_ever({"GPU": 1}) == math.inf
