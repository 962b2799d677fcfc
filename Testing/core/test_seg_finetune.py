"""Fine-tuning UNETR on a real CT and its TotalSegmentator labels, then segmenting NIfTI and DICOM inputs.

One short CPU fine-tune (tiny config, 6 mm voxels, 24^3 crops) is shared by the tests of this module.
"""
from __future__ import annotations

import argparse
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from medgmae_core.cli import main
from medgmae_core.commands import finetune as finetune_command
from medgmae_core.data.volumes import read_volume
from medgmae_core.model import get_config
from medgmae_core.seg import finetune
from medgmae_core.seg.cases import select_fraction
from medgmae_core.seg.evaluate import evaluate_files
from medgmae_core.seg.labels import LabelMap, sidecar_path
from medgmae_core.seg.segment import segment
from medgmae_core.seg.settings import FinetuneSettings
from medgmae_core.seg.unetr import UNETR
from medgmae_core.train.checkpoint import load_checkpoint

STEPS = 24
CLASSES = "liver,spleen,kidneys=kidney_left+kidney_right"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def ts(shared_ct):
    return shared_ct / "totalsegmentator"


def _args(*argv: str) -> FinetuneSettings:
    parser = argparse.ArgumentParser()
    finetune_command.add_arguments(parser)
    return finetune_command.settings_from_args(parser.parse_args(list(argv)))


def _base(ts, out, steps=STEPS, *extra):
    return ["--case", str(ts / "example_ct.nii.gz"), str(ts / "example_seg_fast_force_split.nii.gz"),
            "--label-map", str(ts / "labels_total_v2.json"), "--classes", CLASSES, "--spacing", "6",
            "--roi", "24", "--feature-size", "8", "--steps", str(steps), "--val-every", str(steps),
            "--checkpoint-every", "12", "--lr", "1e-2", "--warmup", "2", "--layer-decay", "0.9",
            "--progress-json", "--quiet", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run(ts, tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    summary = finetune.run(_args(*_base(ts, out)))
    return out, summary


@pytest.mark.slow
def test_short_finetune_beats_untrained(run, capsys):
    out, summary = run
    hist = json.loads((out / "history.json").read_text())
    first, last = hist["val"][0], hist["val"][-1]
    assert first["step"] == 0 and last["step"] == STEPS
    # the untrained network is near chance; a few dozen steps learn the organs
    assert last["dice"] > first["dice"] + 0.08, (first, last)
    assert last["dice_per_class"]["liver"] > 0.3, last
    losses = [v for _, v in hist["loss"]]
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    assert (out / "curves.png").stat().st_size > 5000
    assert summary["final_dice"] == pytest.approx(last["dice"])


@pytest.mark.slow
def test_checkpoint_carries_labels_and_resumes(run, ts, tmp_path, capsys):
    out, _ = run
    ckpt = load_checkpoint(out / "last.pt")  # weights-only load: plain types only
    extra = ckpt["extra"]
    assert ckpt["step"] == STEPS and extra["task"] == "segmentation"
    assert LabelMap.from_dict(extra["labels"]).names == {1: "liver", 2: "spleen", 3: "kidneys"}
    assert extra["spacing_mm"] == [6.0, 6.0, 6.0] and extra["roi_size"] == [24, 24, 24]
    assert (out / "best.pt").exists() and (out / "step_00000024.pt").exists()

    # resume: two more steps continue from step 24 with the stored history
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    capsys.readouterr()
    finetune.run(_args(*_base(ts, resumed, STEPS + 2), "--resume"))
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines() if x.startswith("{")]
    steps = [x["step"] for x in lines if x["event"] == "progress"]
    assert steps == [STEPS + 1, STEPS + 2]
    assert lines[0]["resumed_from"] == STEPS
    assert load_checkpoint(resumed / "last.pt")["step"] == STEPS + 2
    with pytest.raises(ValueError, match="already holds a run"):
        finetune.run(_args(*_base(ts, resumed, STEPS + 2)))


@pytest.mark.slow
def test_segment_nifti_keeps_grid_and_scores(run, ts, tmp_path):
    out, _ = run
    pred = tmp_path / "seg.nii.gz"
    assert main(["segment", str(ts / "example_ct_sm.nii.gz"), "--checkpoint", str(out / "last.pt"),
                 "--out", str(pred), "--json-lines"]) == 0
    ref = nib.load(ts / "example_ct_sm.nii.gz")
    got = nib.load(pred)
    assert got.shape == ref.shape
    assert np.array_equal(got.affine, ref.affine)
    assert LabelMap.from_json(sidecar_path(pred)).names == {1: "liver", 2: "spleen", 3: "kidneys"}
    labels = np.asarray(got.dataobj)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3} and (labels == 1).sum() > 0
    # scored by name against the TotalSegmentator reference (same patient, another crop)
    res = evaluate_files(pred, ts / "example_seg.nii.gz", labels=ts / "labels_total_v2.json",
                         classes="liver,spleen", with_hd95=False)
    assert res["classes"]["liver"]["dice"] > 0.2


@pytest.mark.slow
def test_segment_dicom_series_keeps_its_grid(run, ts, tmp_path):
    out, _ = run
    pred = tmp_path / "dicom_seg.nii.gz"
    summary = segment(ts / "example_ct_dicom", out / "last.pt", pred)
    ct = read_volume(ts / "example_ct_dicom")  # SimpleITK geometry, LPS -> RAS
    got = nib.load(pred)
    assert got.shape == ct.shape == (512, 512, 20)
    assert np.allclose(got.affine, ct.affine, atol=1e-4)
    assert summary["shape"] == [512, 512, 20]
    # the NIfTI export of the same series has a flipped axis; evaluate realigns it
    res = evaluate_files(pred, ts / "example_seg_dicom.nii.gz", labels=ts / "labels_total_v2.json",
                         classes="liver", with_hd95=False)
    assert res["classes"]["liver"]["ref_voxels"] > 0


def test_data_errors(ts, tmp_path):
    # image and label on different grids (example_ct_sm has 30 slices, this label map 112)
    with pytest.raises(ValueError, match="share one voxel grid"):
        finetune.run(_args("--case", str(ts / "example_ct_sm.nii.gz"), str(ts / "example_seg_fast_force_split.nii.gz"),
                           "--label-map", str(ts / "labels_total_v2.json"), "--classes", "liver",
                           "--steps", "1", "--out", str(tmp_path / "a")))
    # label ids the label map does not name
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"labels": {"1": "spleen", "5": "liver"}}))
    with pytest.raises(ValueError, match="not in the label map"):
        finetune.run(_args("--case", str(ts / "example_ct_sm.nii.gz"), str(ts / "example_seg.nii.gz"),
                           "--label-map", str(partial), "--classes", "liver", "--spacing", "0",
                           "--steps", "1", "--out", str(tmp_path / "b")))
    # a class name that is not in the label map
    with pytest.raises(ValueError, match="'livers' is not in the label map.*liver"):
        finetune.run(_args("--case", str(ts / "example_ct_sm.nii.gz"), str(ts / "example_seg.nii.gz"),
                           "--label-map", str(ts / "labels_total_v2.json"), "--classes", "livers",
                           "--steps", "1", "--out", str(tmp_path / "c")))


def test_label_fraction_is_deterministic():
    a = select_fraction(100, 0.1, seed=3)
    assert a == select_fraction(100, 0.1, seed=3) and len(a) == 10
    assert a != select_fraction(100, 0.1, seed=4)
    assert set(select_fraction(100, 0.01, seed=3)) <= set(range(100))
    assert len(select_fraction(50, 0.01, seed=0)) == 1  # at least one case
    assert select_fraction(7, 1.0, seed=0) == list(range(7))
    with pytest.raises(ValueError, match="label-fraction"):
        select_fraction(10, 0.0, seed=0)


def test_layer_decay_groups():
    net = UNETR(get_config("tiny", img_size=24, embed_dim=48, num_heads=2, depth=4), 3, feature_size=4)
    groups = finetune.layer_decay_param_groups(net, 1e-3, 0.05, 0.5)
    by_layer = {g["layer"]: g["lr"] for g in groups}
    assert by_layer[5] == pytest.approx(1e-3)  # decoder and final norm
    assert by_layer[1] == pytest.approx(1e-3 * 0.5 ** 4)  # first block
    assert by_layer[0] == pytest.approx(1e-3 * 0.5 ** 5)  # patch embedding, cls token
    assert all(g["weight_decay"] == 0.0 for g in groups if any(p.ndim <= 1 for p in g["params"]))
    net.freeze_encoder(True)
    frozen = finetune.layer_decay_param_groups(net, 1e-3, 0.05, 0.5)
    assert {g["layer"] for g in frozen} == {5}
    # one step with a frozen encoder changes the decoder only
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opt = torch.optim.AdamW(frozen, lr=1e-3)
    net(torch.rand(1, 1, 24, 24, 24)).logsumexp(1).mean().backward()
    opt.step()
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("vit."))
    assert not torch.equal(before["out.conv.conv.weight"], after["out.conv.conv.weight"])


def test_flag_vocabulary_and_hidden_old_spellings(tmp_path):
    """One vocabulary (commands.options): the old spellings still fill the same settings, hidden from --help;
    --config is a YAML file (flags override it) and the old --config SIZE still picks the model size."""
    new = _args("--out", "o", "--spacing-mm", "6", "--img-size", "24,24,16", "--warmup-steps", "2", "--model",
                "base", "--progress-json", "--resume")
    old = _args("--out", "o", "--spacing", "6", "--roi", "24", "24", "16", "--warmup", "2", "--config", "base",
                "--json-lines", "--resume")
    assert new == old
    assert (new.spacing_mm, new.img_size, new.warmup_steps, new.model, new.progress_json, new.resume) == \
        (6.0, [24, 24, 16], 2, "base", True, "auto")
    assert _args("--out", "o", "--resume", "runs/x/step_00000012.pt").resume == "runs/x/step_00000012.pt"
    assert _args("--out", "o").img_size == 96 and _args("--out", "o", "--img-size", "24").img_size == 24
    config = tmp_path / "ft.yaml"
    config.write_text("steps: 7\nimg_size: [24, 24, 16]\nwarmup_steps: 3\n")
    from_yaml = _args("--config", str(config), "--out", "o", "--steps", "9")
    assert (from_yaml.steps, from_yaml.img_size, from_yaml.warmup_steps) == (9, [24, 24, 16], 3)
    config.write_text("stepz: 7\n")
    with pytest.raises(ValueError, match="unknown settings"):
        _args("--config", str(config), "--out", "o")
    parser = argparse.ArgumentParser()
    finetune_command.add_arguments(parser)
    shown = parser.format_help()
    assert "--img-size" in shown and "--roi" not in shown and "--warmup " not in shown and "--json-lines" not in shown
