"""distill.testing's tree comparisons (issue 18, item 6): they cannot pass on trees that differ in structure, or
on nothing at all, as zip() over two trees' leaves did."""
import numpy as np
import pytest

from distill import testing

TREE = {"conv": {"kernel": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)}, "step": np.int32(3)}


def test_equal_trees_pass_with_other_container_types():
  testing.assert_trees_equal(TREE, {"conv": dict(TREE["conv"]), "step": np.int32(3)})
  testing.assert_trees_equal([np.ones(2)], (np.ones(2),))  # a restored checkpoint may hold a list for a tuple


@pytest.mark.parametrize("got,want,message", [
    ({}, {}, "no leaves"),
    ([], [], "no leaves"),
    ({"w": np.ones(2)}, {}, "no leaves"),
    ({}, TREE, r"0 leaves vs 3 expected"),
    ({"conv": TREE["conv"]}, TREE, r"""missing \["\['step'\]"\]"""),
    ({**TREE, "extra": np.ones(1)}, TREE, r"""unexpected \["\['extra'\]"\]"""),
    ({"conv": {"kernel": TREE["conv"]["kernel"], "b": TREE["conv"]["bias"]}, "step": np.int32(3)}, TREE, "missing"),
    ({**TREE, "step": np.int64(3)}, TREE, r"\['step'\]: int64\[\] vs int32\[\]"),
    ({**TREE, "conv": {**TREE["conv"], "kernel": np.ones((4,), np.float32)}}, TREE, r"float32\[4\] vs float32\[2, 2\]"),
    ({**TREE, "conv": {**TREE["conv"], "bias": np.array([0.0, 1e-7], np.float32)}}, TREE,
     r"\['conv'\]\['bias'\] differs"),
])
def test_trees_that_differ_or_are_empty_fail(got, want, message):
  with pytest.raises(AssertionError, match=message):
    testing.assert_trees_equal(got, want)


def test_leaf_pairs_name_each_pair_by_its_path():
  pairs = testing.tree_leaf_pairs(TREE, TREE)
  assert [path for path, _, _ in pairs] == ["['conv']['bias']", "['conv']['kernel']", "['step']"]
  assert all(isinstance(a, np.ndarray) and isinstance(b, np.ndarray) for _, a, b in pairs)
