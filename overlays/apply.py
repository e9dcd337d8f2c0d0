#!/usr/bin/env python3
"""Apply, check or revert the qwen-merge overlays on installed packages.

Each folder `overlays/<name>/` holds an `overlay.toml` and the files it drops in. The manifest says:

    package       = "transformers"          # import name of the target package
    distributions = ["transformers"]        # distribution names that carry its version
    versions      = ["4.52.3"]              # supported versions (a local suffix like +cpu is ignored)
    check         = "python code"           # run by `check`; exit 0 = registered and importable
    [[files]]  src = "qwen2_5_vl_merge"  dst = "models/qwen2_5_vl_merge"   # new files/dirs, never upstream ones
    [[edits]]  file = "models/auto/configuration_auto.py"
               within = "CONFIG_MAPPING_NAMES = OrderedDict("   # optional: search the anchor after this line
               anchor = '        ("qwen2_5_vl", "Qwen2_5_VLConfig"),'
               mode = "after"                                  # after | before | replace
               text = '        ("qwen2_5_vl_merge", "Qwen2_5_VL_MergeConfig"),'

Edits are always computed from the pristine original (saved on first apply), so applying twice equals applying
once, and revert restores every touched file byte for byte and removes every added file. Inserted lines carry
the marker `# qwen-merge overlay`.
"""
from __future__ import annotations

import argparse
import filecmp
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

OVERLAYS_DIR = Path(__file__).resolve().parent
MARKER = "# qwen-merge overlay"
STATE_DIR_NAME = ".qwen-merge-overlay"


class OverlayError(RuntimeError):
    pass


def load_manifest(name: str) -> dict:
    path = OVERLAYS_DIR / name / "overlay.toml"
    if not path.is_file():
        raise OverlayError(f"no overlay named {name!r} (expected {path})")
    manifest = tomllib.loads(path.read_text())
    manifest["name"] = name
    manifest["dir"] = path.parent
    return manifest


def all_overlay_names() -> list[str]:
    return sorted(p.parent.name for p in OVERLAYS_DIR.glob("*/overlay.toml"))


def find_package(manifest: dict, root: Path | None) -> tuple[Path, str]:
    """Return (package dir, installed version) for the manifest's target."""
    package = manifest["package"]
    if root is not None:
        pkg_dir = root / package
        if not pkg_dir.is_dir():
            raise OverlayError(f"{package} not found under {root}")
        search = [str(root)]
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise OverlayError(f"{package} is not installed in {sys.executable}")
        pkg_dir = Path(list(spec.submodule_search_locations)[0])
        search = None
    for dist_name in manifest["distributions"]:
        dists = importlib.metadata.distributions(name=dist_name, path=search) if search else [
            d for d in importlib.metadata.distributions(name=dist_name)]
        for dist in dists:
            return pkg_dir, dist.version
    raise OverlayError(f"cannot read the version of {package}: none of {manifest['distributions']} is installed")


def check_version(manifest: dict, version: str) -> None:
    plain = version.split("+", 1)[0]
    if plain not in manifest["versions"]:
        raise OverlayError(
            f"{manifest['package']} {version} is not supported by the {manifest['name']} overlay "
            f"(supported: {', '.join(manifest['versions'])}); install a supported version first")


def state_paths(pkg_dir: Path, package: str) -> tuple[Path, Path]:
    state_dir = pkg_dir.parent / STATE_DIR_NAME / package
    return state_dir, state_dir / "state.json"


def read_state(pkg_dir: Path, package: str) -> dict:
    _, state_file = state_paths(pkg_dir, package)
    if state_file.is_file():
        return json.loads(state_file.read_text())
    return {"edited": [], "added": [], "created_dirs": []}


def atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def apply_edits(original: str, edits: list[dict], rel: str) -> str:
    lines = original.splitlines(keepends=True)
    for edit in edits:
        start = 0
        if "within" in edit:
            starts = [i for i, line in enumerate(lines) if line.rstrip("\n").startswith(edit["within"])]
            if len(starts) != 1:
                raise OverlayError(f"{rel}: block {edit['within']!r} found {len(starts)} times (expected 1)")
            start = starts[0]
        hits = [i for i in range(start, len(lines)) if lines[i].rstrip("\n") == edit["anchor"]]
        if not hits:
            raise OverlayError(f"{rel}: anchor line not found: {edit['anchor']!r} (unsupported upstream version?)")
        if "within" not in edit and len(hits) > 1:
            raise OverlayError(f"{rel}: anchor {edit['anchor']!r} is ambiguous ({len(hits)} hits); add `within`")
        i = hits[0]
        new = [f"{line}  {MARKER}\n" if line.strip() else "\n" for line in edit["text"].rstrip("\n").split("\n")]
        mode = edit.get("mode", "after")
        if mode == "after":
            lines[i + 1:i + 1] = new
        elif mode == "before":
            lines[i:i] = new
        elif mode == "replace":
            lines[i:i + 1] = new
        else:
            raise OverlayError(f"{rel}: unknown edit mode {mode!r}")
    return "".join(lines)


def overlay_files(manifest: dict) -> list[tuple[Path, str]]:
    """(source file, destination path relative to the package) for every file the overlay drops in."""
    out = []
    for entry in manifest.get("files", []):
        src = manifest["dir"] / entry["src"]
        if src.is_dir():
            for f in sorted(src.rglob("*")):
                if f.is_file() and "__pycache__" not in f.parts:
                    out.append((f, str(Path(entry["dst"]) / f.relative_to(src))))
        else:
            out.append((src, entry["dst"]))
    return out


def drop_pycache(pkg_dir: Path, rel: str) -> None:
    path = pkg_dir / rel
    cache = path.parent / "__pycache__"
    if cache.is_dir():
        for pyc in cache.glob(f"{path.stem}.*.pyc"):
            pyc.unlink()


def apply(manifest: dict, root: Path | None = None, verbose: bool = True) -> bool:
    """Apply one overlay. Returns True when something changed."""
    pkg_dir, version = find_package(manifest, root)
    check_version(manifest, version)
    package = manifest["package"]
    state_dir, state_file = state_paths(pkg_dir, package)
    state = read_state(pkg_dir, package)
    changed = False

    edits_by_file: dict[str, list[dict]] = {}
    for edit in manifest.get("edits", []):
        edits_by_file.setdefault(edit["file"], []).append(edit)
    for rel in [r for r in state["edited"] if r not in edits_by_file]:  # no longer edited: restore
        shutil.copy2(state_dir / "originals" / rel, pkg_dir / rel)
        drop_pycache(pkg_dir, rel)
        state["edited"].remove(rel)
        changed = True
    for rel, edits in edits_by_file.items():
        target = pkg_dir / rel
        backup = state_dir / "originals" / rel
        if backup.is_file():
            original = backup.read_text()
        else:
            original = target.read_text()
            if MARKER in original:
                raise OverlayError(f"{target} carries overlay marks but no saved original; reinstall {package}")
            backup.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(target, backup)
        wanted = apply_edits(original, edits, rel)
        if target.read_text() != wanted:
            atomic_write(target, wanted.encode())
            drop_pycache(pkg_dir, rel)
            changed = True
        if rel not in state["edited"]:
            state["edited"].append(rel)

    wanted_files = overlay_files(manifest)
    for src, rel in wanted_files:
        dst = pkg_dir / rel
        if dst.exists() and rel not in state["added"]:
            raise OverlayError(f"{dst} already exists and is not ours; refusing to overwrite an upstream file")
        missing_dirs = [d for d in reversed(dst.relative_to(pkg_dir).parents) if not (pkg_dir / d).exists()]
        for d in missing_dirs:
            state["created_dirs"].append(str(d))
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not dst.exists() or not filecmp.cmp(src, dst, shallow=False):
            atomic_write(dst, src.read_bytes())
            drop_pycache(pkg_dir, rel)
            changed = True
        if rel not in state["added"]:
            state["added"].append(rel)
    stale = [rel for rel in state["added"] if rel not in {r for _, r in wanted_files}]
    for rel in stale:
        (pkg_dir / rel).unlink(missing_ok=True)
        state["added"].remove(rel)
        changed = True

    state_dir.mkdir(parents=True, exist_ok=True)
    state["version"] = version
    atomic_write(state_file, json.dumps(state, indent=1).encode())
    if verbose:
        print(f"[overlay] {manifest['name']}: {'applied' if changed else 'already applied'} "
              f"({package} {version} at {pkg_dir})")
    return changed


def revert(manifest: dict, root: Path | None = None, verbose: bool = True) -> bool:
    package = manifest["package"]
    pkg_dir, _ = find_package(manifest, root)
    state_dir, state_file = state_paths(pkg_dir, package)
    if not state_file.is_file():
        if verbose:
            print(f"[overlay] {manifest['name']}: nothing to revert")
        return False
    state = json.loads(state_file.read_text())
    for rel in state["edited"]:
        shutil.copy2(state_dir / "originals" / rel, pkg_dir / rel)
        drop_pycache(pkg_dir, rel)
    for rel in state["added"]:
        (pkg_dir / rel).unlink(missing_ok=True)
        drop_pycache(pkg_dir, rel)
    for rel in sorted(state["created_dirs"], key=len, reverse=True):
        d = pkg_dir / rel
        shutil.rmtree(d / "__pycache__", ignore_errors=True)
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    shutil.rmtree(state_dir)
    if not any(state_dir.parent.iterdir()):
        state_dir.parent.rmdir()
    if verbose:
        print(f"[overlay] {manifest['name']}: reverted ({package} at {pkg_dir})")
    return True


def check(manifest: dict, python: str = sys.executable) -> tuple[bool, str]:
    """Run the manifest's check snippet in a fresh interpreter; (ok, last line of its output)."""
    proc = subprocess.run([python, "-c", manifest["check"]], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    # success: the snippet's own last printed line; failure: the error (last line of stderr)
    lines = (proc.stdout if proc.returncode == 0 else proc.stderr).strip().splitlines() or \
        (proc.stdout + proc.stderr).strip().splitlines()
    return proc.returncode == 0, (lines[-1] if lines else "")


def tree_digest(pkg_dir: Path) -> dict[str, str]:
    """sha256 of every file under a package, __pycache__ excluded (used to prove exact reverts)."""
    return {str(p.relative_to(pkg_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(pkg_dir.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["apply", "revert", "check", "list"])
    parser.add_argument("overlays", nargs="*", help=f"overlay names (default: all of {all_overlay_names()})")
    parser.add_argument("--root", type=Path, help="apply to packages under this directory instead of the "
                                                    "running interpreter's site-packages (for scratch copies)")
    args = parser.parse_args(argv)
    names = args.overlays or all_overlay_names()
    if args.action == "list":
        for name in names:
            m = load_manifest(name)
            print(f"{name}: {m['package']} {', '.join(m['versions'])}")
        return 0
    failed = 0
    for name in names:
        try:
            manifest = load_manifest(name)
            if args.action == "apply":
                apply(manifest, args.root)
            elif args.action == "revert":
                revert(manifest, args.root)
            else:
                ok, detail = check(manifest)
                print(f"[check] {manifest['package']:<12} {'OK  ' if ok else 'FAIL'} {detail}")
                failed += not ok
        except OverlayError as e:
            print(f"[overlay] {name}: error: {e}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
