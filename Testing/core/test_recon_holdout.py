"""The benchmark's hold-out check: is a volume in the training list a checkpoint records?"""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from recon_init import CHEST_CTA, held_out, training_inputs  # noqa: E402


def test_training_inputs_from_train_config_and_training_data():
    ck = {"train_config": {"data": ["phantom:24", "../shared/data/ct/totalsegmentator/example_ct.nii.gz"]},
          "extra": {"training_data": ["phantom_0003", "example_ct"]}}
    assert training_inputs(ck) == ["phantom:24", "../shared/data/ct/totalsegmentator/example_ct.nii.gz",
                                   "phantom_0003", "example_ct"]
    assert training_inputs({"train_config": {"data": "phantom"}}) == ["phantom"]
    assert training_inputs({"train_config": {}, "extra": {}}) is None


def test_held_out_by_path_folder_name_and_phantom_seed(tmp_path):
    assert held_out(str(CHEST_CTA), None)["status"] == "unknown"
    training = ["phantom:24", str(CHEST_CTA.parent / "example_ct.nii.gz"), str(CHEST_CTA.parent / "example_ct_dicom")]
    assert held_out(str(CHEST_CTA), training)["status"] == "held-out"
    assert held_out(str(CHEST_CTA.parent / "example_ct.nii.gz"), training)["status"] == "in training set"
    # a folder in the list covers every file under it; a bare case name matches the file's stem
    hit = held_out(str(CHEST_CTA), [str(CHEST_CTA.parent)])
    assert hit["status"] == "in training set" and hit["entry"] == str(CHEST_CTA.parent)
    assert held_out(str(CHEST_CTA), ["chest_cta_pulmonary_ct_cropped"])["status"] == "in training set"
    # phantoms: phantom:N covers seeds 0..N-1, case names phantom_<seed>
    assert held_out("phantom", training, phantom_seed=1001)["status"] == "held-out"
    assert held_out("phantom", training, phantom_seed=5)["status"] == "in training set"
    assert held_out("phantom", ["phantom_1001"], phantom_seed=1001)["status"] == "in training set"


@pytest.mark.parametrize("bad", [[], None])
def test_no_list_is_unknown(bad):
    assert held_out("phantom", bad or None, phantom_seed=1001)["status"] == "unknown"
