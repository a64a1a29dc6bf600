"""The loader's synthetic corpus (metaserver/synthetic.py) is reproducible: benchmark figures
from different versions are comparable only if every version generates the same headers."""

from __future__ import annotations

import hashlib

from metaserver import index, synthetic


def test_synthetic_headers_are_the_corpus_every_benchmark_used() -> None:
    """The first 2,000 headers hash to what the generator has produced since the loader
    benchmark began (a change in the order of random draws would change every later value),
    and each header's path names its own patient, study and series."""
    digest = hashlib.sha256()
    records = list(synthetic.headers(20))
    for path, xml in records:
        digest.update(path.encode())
        digest.update(xml)
    assert digest.hexdigest() == "9bd92026ed550dba696efe2d75914c37f2cfbd057694087b337170a022ce797c"
    assert len(records) == 2000 and len({p for p, _ in records}) == 2000
    for path, xml in records[::97]:
        h = index.index_header(xml)
        assert path.split("/")[2:5] == [h.patient, h.study, h.series]
