"""The hand-written ViT-S region is the same text in every method file (STYLE.md §3.5)."""

import difflib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
METHOD_FILES = ["scm.py", "sat.py", "bas.py", "dawsol.py"]
VIT_FILES = [*METHOD_FILES, "pretrain.py"]  # pretrain.py trains the same ViT, so it carries the same region


def region(name: str) -> str:
    text = (ROOT / name).read_text()
    match = re.search(r"# >>> vit-s begin\n(.*?)# <<< vit-s end", text, re.S)
    assert match, f"{name} has no '# >>> vit-s begin' ... '# <<< vit-s end' region"
    return match.group(1)


def test_reference_region_holds_the_backbone():
    body = region("tscam.py")
    for name in ("class Attention", "class Block", "class VisionTransformer", "def load_deit_weights"):
        assert name in body


@pytest.mark.parametrize("name", VIT_FILES)
def test_vit_region_identical(name):
    if not (ROOT / name).exists():
        pytest.skip(f"{name} not written yet")
    reference, other = region("tscam.py"), region(name)
    diff = "".join(difflib.unified_diff(reference.splitlines(True), other.splitlines(True), "tscam.py", name))
    assert reference == other, f"the ViT-S region of {name} differs from tscam.py's; copy it from tscam.py:\n{diff}"


@pytest.mark.parametrize("name", ["tscam.py", *METHOD_FILES])
def test_section_order(name):
    """Every method file has the same seven sections, in the same order (STYLE.md §3.2)."""
    if not (ROOT / name).exists():
        pytest.skip(f"{name} not written yet")
    headers = re.findall(r"^# %% (\d)\. ", (ROOT / name).read_text(), re.M)
    assert headers == list("1234567"), f"{name} sections: {headers}"
