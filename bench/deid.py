"""De-identification throughput on one core (issues 3, 16), per file, in one thread, for
CT_small and a ~0.5 MB CT instance: what ``dgf_up`` does with each file (analyze, apply the
Annex E profile, encode the identity record), and the same with the file's XML header derived
too, as uploaders did until the header became the storing site's work.

    python bench/deid.py [--files 400] [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import synth  # noqa: E402
from dgf.crypto import VaultKeys  # noqa: E402
from dgf.dicom import deid, identity  # noqa: E402
from dgf.dicom.profile import Profile  # noqa: E402
from dgf.dicom.xmlheader import header_xml  # noqa: E402


def one_pass(datas: list[bytes], profile: Profile, keys: VaultKeys, header: bool) -> float:
    t0 = time.process_time()
    for data in datas:
        plan = deid.analyze(data, profile)
        pseudo = deid.Pseudonyms({u: keys.pseudo_uid(u) for u in plan.uids},
                                 keys.pseudo_patient(plan.patient_key), keys.date_offset_days(plan.patient_key))
        result = deid.apply(plan, pseudo, profile)
        if header:
            header_xml(result.data)
        identity.encode(result.identity)
    return len(datas) / (time.process_time() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=400)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dgf-bench-deid-") as where:    # read into memory, then gone
        tmp = Path(where)
        corpora = {
            "CT_small (39 KB)": [p.read_bytes() for p in synth.small_corpus(tmp / "s", args.files * 2, 20)[::2]],
            "CT 0.5 MB": [p.read_bytes() for p in synth.ct_corpus(tmp / "c", args.files // 4, 10)],
        }
    profile, keys = Profile(), VaultKeys(os.urandom(64))
    print("| corpus | work | files per CPU second (median) | runs |")
    print("|---|---|---|---|")
    for name, datas in corpora.items():
        one_pass(datas[:20], profile, keys, True)  # warm caches (profile tables, dictionary)
        for header in (False, True):
            rates = [one_pass(datas, profile, keys, header) for _ in range(args.runs)]
            work = "+ XML header" if header else "dgf_up's"
            print(f"| {name} | {work} | {statistics.median(rates):.0f} | {', '.join(f'{r:.0f}' for r in rates)} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
