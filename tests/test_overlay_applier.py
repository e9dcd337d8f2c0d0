"""The overlay applier on a scratch copy of the installed transformers: apply, re-apply, exact revert, guards."""
import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from overlays import apply as applier

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def scratch_root(tmp_path) -> Path:
    """A site-packages-like dir holding pristine copies of transformers' auto mappings and its dist-info."""
    import transformers

    installed = Path(transformers.__file__).parent
    root = tmp_path / "site"
    shutil.copytree(installed / "models" / "auto", root / "transformers" / "models" / "auto",
                    ignore=shutil.ignore_patterns("__pycache__"))
    # the installed files carry our overlay: restore the originals the applier saved
    originals = installed.parent / applier.STATE_DIR_NAME / "transformers" / "originals"
    for original in originals.rglob("*.py"):
        shutil.copy2(original, root / "transformers" / original.relative_to(originals))
    dist = importlib.metadata.distribution("transformers")
    shutil.copytree(Path(dist._path), root / Path(dist._path).name)
    return root


def test_apply_reapply_revert_is_exact(scratch_root):
    manifest = applier.load_manifest("transformers")
    pkg = scratch_root / "transformers"
    pristine = applier.tree_digest(pkg)
    assert not any(applier.MARKER in p.read_text() for p in pkg.rglob("*.py"))

    assert applier.apply(manifest, scratch_root, verbose=False) is True
    applied = applier.tree_digest(pkg)
    assert (pkg / "models/qwen2_5_vl_merge/modeling_qwen2_5_vl_merge.py").is_file()
    config_auto = (pkg / "models/auto/configuration_auto.py").read_text()
    assert config_auto.count(applier.MARKER) == 2
    assert '("qwen2_5_vl_merge", "Qwen2_5_VL_MergeConfig"),  # qwen-merge overlay' in config_auto
    edited = {e["file"] for e in manifest["edits"]}
    assert {f for f in pristine if pristine[f] != applied.get(f)} == edited

    assert applier.apply(manifest, scratch_root, verbose=False) is False  # second apply: nothing to do
    assert applier.tree_digest(pkg) == applied

    assert applier.revert(manifest, scratch_root, verbose=False) is True
    assert applier.tree_digest(pkg) == pristine
    assert not (pkg / "models/qwen2_5_vl_merge").exists()
    assert not (scratch_root / applier.STATE_DIR_NAME).exists()


def test_edits_are_rebuilt_from_originals_when_the_overlay_changes(scratch_root, tmp_path):
    manifest = applier.load_manifest("transformers")
    applier.apply(manifest, scratch_root, verbose=False)
    manifest["edits"] = manifest["edits"][:1]  # a newer overlay with fewer edits
    applier.apply(manifest, scratch_root, verbose=False)
    text = (scratch_root / "transformers/models/auto/modeling_auto.py").read_text()
    assert applier.MARKER not in text
    assert (scratch_root / "transformers/models/auto/configuration_auto.py").read_text().count(applier.MARKER) == 1


def test_unsupported_version_is_refused(scratch_root):
    meta = next(scratch_root.glob("transformers-*.dist-info")) / "METADATA"
    meta.write_text(meta.read_text().replace("Version: 4.52.3", "Version: 4.51.0", 1))
    before = applier.tree_digest(scratch_root / "transformers")
    with pytest.raises(applier.OverlayError, match=r"transformers 4\.51\.0 is not supported.*4\.52\.3"):
        applier.apply(applier.load_manifest("transformers"), scratch_root, verbose=False)
    assert applier.tree_digest(scratch_root / "transformers") == before


def test_missing_anchor_and_foreign_file_are_refused(scratch_root):
    manifest = applier.load_manifest("transformers")
    target = scratch_root / "transformers/models/auto/processing_auto.py"
    target.write_text(target.read_text().replace('("qwen2_5_vl", "Qwen2_5_VLProcessor")', '("qwen2_5_vl", "X")'))
    with pytest.raises(applier.OverlayError, match="anchor line not found"):
        applier.apply(manifest, scratch_root, verbose=False)

    manifest["edits"] = []
    foreign = scratch_root / "transformers/models/qwen2_5_vl_merge/__init__.py"
    foreign.parent.mkdir(parents=True)
    foreign.write_text("# someone else's file\n")
    with pytest.raises(applier.OverlayError, match="not ours"):
        applier.apply(manifest, scratch_root, verbose=False)
    assert foreign.read_text() == "# someone else's file\n"


def test_cli_apply_and_revert_on_scratch_copy(scratch_root):
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "overlays/apply.py"), *a,  # noqa: E731
                                     "--root", str(scratch_root)], capture_output=True, text=True)
    first, second = run("apply", "transformers"), run("apply", "transformers")
    assert first.returncode == 0 and "applied (transformers 4.52.3" in first.stdout
    assert second.returncode == 0 and "already applied" in second.stdout
    assert run("revert", "transformers").returncode == 0
    bad = run("apply", "no-such-overlay")
    assert bad.returncode == 1 and "no overlay named 'no-such-overlay'" in bad.stderr


def test_every_manifest_is_well_formed():
    for name in applier.all_overlay_names():
        manifest = applier.load_manifest(name)
        assert manifest["versions"] and manifest["distributions"] and manifest["check"].strip()
        for src, rel in applier.overlay_files(manifest):
            assert src.is_file() and not Path(rel).is_absolute()
        for edit in manifest.get("edits", []):
            assert edit["anchor"] and edit["text"] and edit.get("mode", "after") in ("after", "before", "replace")
        json.dumps(manifest, default=str)
