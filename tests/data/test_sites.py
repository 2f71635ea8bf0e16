"""Unequal sites and the pooled baseline (demo, benchmarks): a smaller site keeps whole patients; the pool verifies."""

from echocare_core.data.contract import read_manifest, verify_dataset
from echocare_core.synthetic.dataset import keep_patients, pool_sites, write_dataset


def test_shrunk_sites_and_the_pooled_dataset_pass_the_check(tmp_path):
    sites = write_dataset(tmp_path / "data", "segmentation", sites=2, per_site=20, size=64, seed=0)
    before = read_manifest(sites[1])[1]
    keep_patients(sites[1], 0.25)
    after = read_manifest(sites[1])[1]
    kept = {r["patient"] for r in after}
    assert len(after) < len(before) and after == [r for r in before if r["patient"] in kept]
    assert {r["split"] for r in after} == {"train", "val", "test"}
    pooled = pool_sites(sites, tmp_path / "pooled")
    report = verify_dataset(pooled)
    assert report.ok, report.problems
    assert report.rows == len(read_manifest(sites[0])[1]) + len(after)
