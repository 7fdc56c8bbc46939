"""pretrain.py: the synthetic backbone. Its classes are not the WSOL set's, the command still writes a DeiT-format
checkpoint with the committed one's keys and shapes, every method loads it, and the presets default to it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import bas
import common
import data
import dawsol
import pretrain
import sat
import scm
import tscam

ROOT = Path(__file__).resolve().parent.parent
METHODS = [tscam, scm, sat, bas, dawsol]


def test_pretraining_classes_are_not_the_wsol_classes():
    assert len(pretrain.PRETRAIN_CLASSES) == len(data.SHAPES) * len(data.TEXTURES) - len(data.SYNTH_CLASSES) == 90
    assert not set(pretrain.PRETRAIN_CLASSES) & set(data.SYNTH_CLASSES)
    images, labels = pretrain.make_set(180, 32, seed=0, split=0)
    assert images.shape == (180, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [2] * 90  # balanced over the 90 classes


def test_the_command_still_writes_the_committed_checkpoints_keys_and_shapes(tmp_path):
    """`python pretrain.py` (here a few steps) -> {"model": DeiT keys + head.*} shaped like weights/synthetic_deit.pth,
    loadable by every method's own load_deit_weights with the synthetic preset's model."""
    out = tmp_path / "deit.pth"
    result = subprocess.run([sys.executable, "pretrain.py", "--n-train", "256", "--n-val", "90", "--epochs", "1",
                             "--batch-size", "64", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    new = torch.load(out, weights_only=True)["model"]
    committed = torch.load(common.SYNTHETIC_DEIT, weights_only=True)["model"]
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in committed.items()}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"} <= new.keys()
    assert new["head.weight"].shape == (90, 128)
    for module in METHODS:
        preset = module.PRESETS["synthetic"]
        assert preset["pretrained"] == common.SYNTHETIC_DEIT  # the synthetic presets fine-tune it, as CUB's do DeiT
        vit = module.VisionTransformer(preset["img_size"], preset["patch_size"], preset["embed_dim"],
                                       preset["depth"], preset["heads"])
        module.load_deit_weights(vit, str(out))
        assert torch.equal(vit.pos_embed, new["pos_embed"]) and torch.equal(vit.blocks[3].mlp.fc2.weight,
                                                                            new["blocks.3.mlp.fc2.weight"])


def test_committed_backbone_classifies_its_own_val_split():
    """The committed checkpoint is a trained classifier, not random weights: well above chance (1.1 %) on fresh
    images of the pretraining classes."""
    state = torch.load(common.SYNTHETIC_DEIT, weights_only=True)
    args = pretrain.Args(**{k: v for k, v in state["args"].items() if k in pretrain.Args.__dataclass_fields__})
    model = pretrain.DeiT(args, len(pretrain.PRETRAIN_CLASSES))
    model.vit.load_state_dict({k: v for k, v in state["model"].items() if not k.startswith("head.")})
    model.head.load_state_dict({"weight": state["model"]["head.weight"], "bias": state["model"]["head.bias"]})
    images, labels = pretrain.make_set(450, 64, seed=args.seed, split=2)  # a split pretraining never saw
    assert pretrain.accuracy(model, images, labels, "cpu") > 30.0


def test_a_missing_synthetic_backbone_says_how_to_rebuild_it(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "SYNTHETIC_DEIT", str(tmp_path / "gone.pth"))
    with pytest.raises(SystemExit, match="python pretrain.py"):
        common.check_pretrained(str(tmp_path / "gone.pth"))
    with pytest.raises(SystemExit, match="--pretrained .*nope.pth: no such file"):
        common.check_pretrained(str(tmp_path / "nope.pth"))
    common.check_pretrained("none")
