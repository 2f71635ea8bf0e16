"""The demo's data preparation: a smaller hospital keeps whole patients; the pooled baseline verifies."""

from echocare_core.cli.demo import _pooled, _shrink
from echocare_core.data.contract import read_manifest, verify_dataset
from echocare_core.data.synthetic_dataset import write_dataset


def test_shrunk_sites_and_the_pooled_dataset_pass_the_check(tmp_path):
    sites = write_dataset(tmp_path / "data", "segmentation", sites=2, per_site=20, size=64, seed=0)
    before = read_manifest(sites[1])[1]
    _shrink(sites[1], 0.25)
    after = read_manifest(sites[1])[1]
    kept = {r["patient"] for r in after}
    assert len(after) < len(before) and after == [r for r in before if r["patient"] in kept]
    pooled = _pooled(sites, tmp_path / "pooled")
    report = verify_dataset(pooled)
    assert report.ok, report.problems
    assert report.rows == len(read_manifest(sites[0])[1]) + len(after)
