"""The FUSE mount against sshfs (issue 6), same machine, same run, medians of --runs.

    .venv/bin/python bench/fuse.py --runs 3

dgf: a local federation on loopback, mounted with `dgf mount` (researcher, de-identified).
sshfs: OpenSSH's sshd on a free loopback port serving the same files as plain files, mounted with
sshfs (Debian packages sshfs, openssh-server; root only, for sshd and drop_caches).

Cold = after unmount, cleared dgf block cache and `echo 3 > /proc/sys/vm/drop_caches`, remount.
Warm = the same read again on the same mount.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402

from bench import synth  # noqa: E402
from bench.measure import save  # noqa: E402
from dgf import local  # noqa: E402
from dgf.client import Client  # noqa: E402

BIN = Path(sys.executable).parent


def big_dicom(path: Path, mb: int = 200) -> None:
    src = get_testdata_file("CT_small.dcm", download=False)
    if not isinstance(src, str):
        raise SystemExit("pydicom's test file CT_small.dcm is missing.")
    ds = pydicom.dcmread(src)
    frames = mb * 1024 * 1024 // (1024 * 1024 * 2)
    ds.Rows = ds.Columns = 1024
    ds.NumberOfFrames = frames
    ds.PixelData = np.random.default_rng(1).integers(0, 4000, (frames, 1024, 1024), dtype=np.int16).tobytes()
    ds.save_as(path)


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def sh(cmd: str) -> None:
    subprocess.run(cmd, shell=True, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def drop_caches() -> None:
    subprocess.run("sync; echo 3 > /proc/sys/vm/drop_caches", shell=True, check=False)


class Sshfs:
    def __init__(self, work: Path, served: Path) -> None:
        self.work, self.served, self.mnt = work, served, work / "sshfs"
        self.mnt.mkdir()
        key = work / "id_ed25519"
        sh(f"ssh-keygen -q -t ed25519 -N '' -f {key}")
        sh(f"ssh-keygen -q -t ed25519 -N '' -f {work}/host_key")
        (work / "authorized_keys").write_text((work / "id_ed25519.pub").read_text())
        os.chmod(work / "authorized_keys", 0o600)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        os.makedirs("/run/sshd", exist_ok=True)
        self.sshd = subprocess.Popen([
            "/usr/sbin/sshd", "-D", "-p", str(self.port), "-h", f"{work}/host_key", "-o", "ListenAddress=127.0.0.1",
            "-o", f"AuthorizedKeysFile={work}/authorized_keys", "-o", "PasswordAuthentication=no",
            "-o", "PermitRootLogin=prohibit-password", "-o", "StrictModes=no"], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        self.opts = (f"-p {self.port} -o IdentityFile={key} -o StrictHostKeyChecking=no "
                     f"-o UserKnownHostsFile=/dev/null")

    def mount(self) -> Path:
        sh(f"sshfs root@127.0.0.1:{self.served} {self.mnt} {self.opts}")
        return self.mnt

    def umount(self) -> None:
        subprocess.run(["fusermount3", "-u", str(self.mnt)], check=False)

    def close(self) -> None:
        self.umount()
        self.sshd.terminate()


class DgfMount:
    def __init__(self, fed: local.Federation, work: Path) -> None:
        self.config = fed.config("researcher")
        self.mnt = work / "dgf"
        self.mnt.mkdir()

    def mount(self) -> Path:
        env = dict(os.environ, DGF_CONFIG=str(self.config))
        subprocess.run([str(BIN / "dgf"), "mount", str(self.mnt)], check=True, env=env, stdout=subprocess.DEVNULL)
        return self.mnt

    def umount(self) -> None:
        subprocess.run([str(BIN / "dgf"), "umount", str(self.mnt)], check=False)
        cache = Path.home() / ".cache" / "dgf"
        for p in [Path(self.config).parent / "cache", cache]:
            shutil.rmtree(p / "mount" / "blocks", ignore_errors=True)

    def close(self) -> None:
        self.umount()


def measure(system: object, big: str, small_dir: str, many_dir: str, runs: int, n_small: int) -> dict[str, object]:
    cold_big, warm_big, fio_cold, small_cold, small_warm, ls_warm, find_cold, find_warm = ([] for _ in range(8))
    for _ in range(runs):
        system.umount()  # type: ignore[attr-defined]
        drop_caches()
        root: Path = system.mount()  # type: ignore[attr-defined]
        dd = f"dd if={root / big} of=/dev/null bs=1M status=none"
        cat = f"cat {root / small_dir}/* > /dev/null"
        ls = f"ls -l {root / small_dir} > /dev/null"
        find = f"find {root / many_dir} -type f | wc -l > /dev/null"
        cold_big.append(timed(functools.partial(sh, dd)))
        warm_big.append(timed(functools.partial(sh, dd)))
        small_cold.append(timed(functools.partial(sh, cat)))
        small_warm.append(timed(functools.partial(sh, cat)))
        sh(ls)
        ls_warm.append(timed(functools.partial(sh, ls)))
        find_cold.append(timed(functools.partial(sh, find)))
        find_warm.append(timed(functools.partial(sh, find)))
        system.umount()  # type: ignore[attr-defined]
        drop_caches()
        root = system.mount()  # type: ignore[attr-defined]
        fio_cold.append(timed(functools.partial(sh, f"fio --name=r --filename={root / big} --rw=read --bs=1M "
                                                    "--readonly --ioengine=psync --output=/dev/null")))
    size_mb = os.path.getsize(root / big) / 1e6
    med = statistics.median
    system.umount()  # type: ignore[attr-defined]
    return {"big_mb": size_mb, "cold_MBps": size_mb / med(cold_big), "warm_MBps": size_mb / med(warm_big),
            "fio_cold_MBps": size_mb / med(fio_cold),
            "small_cold_files_per_s": n_small / med(small_cold), "small_warm_files_per_s": n_small / med(small_warm),
            "ls_l_1000_warm_ms": 1000 * med(ls_warm), "find_10000_cold_s": med(find_cold),
            "find_10000_warm_s": med(find_warm)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big-mb", type=int, default=200)
    ap.add_argument("--small", type=int, default=1000, help="files for cat and ls -l")
    ap.add_argument("--many", type=int, default=10000, help="files for find")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dgf-fbench-"))
    served = work / "served"
    fed = local.up(work / "fed")
    try:
        src = work / "src"
        (src / "small").mkdir(parents=True)
        big = src / "big.dcm"
        big_dicom(big, args.big_mb)
        small = synth.small_corpus(src / "small", args.small)
        many = synth.small_corpus(src / "many", args.many, patients=200, seed=3)
        with Client(fed.config("clinician")) as c:
            c.upload([big], to="/bench/big")
            c.upload(small, to="/bench/small")
            c.upload(many, to="/bench/many")
            big_path = c.ls("/bench/big")[0].path
            # sshfs serves the same de-identified bytes, laid out as in the archive.
            c.download(["/bench"], served)
        small_dir = "bench/small"
        rel_big = big_path.lstrip("/")
        # The small corpus lands in patient/study/series folders; flatten both trees the same way.
        for tree in (served / "bench" / "small",):
            for f in list(tree.rglob("*.dcm")):
                f.rename(tree / f.name)
        report: dict[str, object] = {"runs": args.runs}
        dgf_mount = DgfMount(fed, work)
        # Flatten the archive's small tree too, so both sides list one 1000-entry directory.
        with Client(fed.config("clinician")) as c:
            for path in _files(c, "/bench/small"):
                name = path.rsplit("/", 1)[1]
                if path != f"/bench/small/{name}":
                    c.mv(path, f"/bench/small/{name}")
        report["dgf"] = measure(dgf_mount, rel_big, small_dir, "bench/many", args.runs, args.small)
        ssh = Sshfs(work, served)
        try:
            report["sshfs"] = measure(ssh, rel_big, small_dir, "bench/many", args.runs, args.small)
        finally:
            ssh.close()
    finally:
        local.down(work / "fed", quiet=True)
    save("fuse", report)
    shutil.rmtree(work, ignore_errors=True)


def _files(c: Client, root: str) -> list[str]:
    out = []
    for st in c.ls(root):
        out += _files(c, st.path) if st.is_dir else [st.path]
    return out


if __name__ == "__main__":
    main()
