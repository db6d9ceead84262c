"""Skip bookkeeping: the rate-limited log, counts in iterator states (old list states too), unusable data."""

import grain
import pytest

from bagel_jax.data import pack
from bagel_jax.data.pack import Budgets, PackIterDataset, Skipped
from bagel_jax.data.skips import LEGACY_SKIP_REASONS, SKIP_REASONS, SkipLog, array_to_counts, counts_to_array, show


def test_skip_log_is_rate_limited_per_reason(caplog):
    caplog.set_level("WARNING")
    now = [0.0]
    log = SkipLog("skipped", first=2, interval_s=60, clock=lambda: now[0])
    for i in range(10):
        log("undecodable_image", f"a.jsonl:{i}: broken")
    log("empty_text", "b.jsonl:1: empty", count=3)  # one message standing for 3 skips
    now[0] = 61.0
    log("undecodable_image", "a.jsonl:99: broken")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "skipped (undecodable_image): a.jsonl:0: broken",
        "skipped (undecodable_image): a.jsonl:1: broken",
        "skipped (empty_text): b.jsonl:1: empty (and 2 more empty_text since the last one logged)",
        "skipped (undecodable_image): a.jsonl:99: broken (and 8 more undecodable_image since the last one logged)",
    ]
    assert log.seen == {"undecodable_image": 11, "empty_text": 3}


def test_counts_round_trip_and_old_list_states_load():
    counts = dict.fromkeys(SKIP_REASONS, 0) | {"image_too_large": 2, "internal_error": 1}
    assert array_to_counts(counts_to_array(counts)) == counts
    old = [5, 1, 0, 2, 0, 0, 3]  # the 7 counts an iterator state held before skips.py, in their old order
    restored = array_to_counts(counts_to_array(old))
    assert restored == dict.fromkeys(SKIP_REASONS, 0) | dict(zip(LEGACY_SKIP_REASONS, old, strict=True))
    with pytest.raises(ValueError, match="unknown reason 'gone'"):
        counts_to_array({"gone": 1})
    assert show(None) == "null" and show(5) == "int 5" and show("x" * 100).startswith("str 'xxx")
    deep = []
    for _ in range(10_000):
        deep = [deep]
    assert show(deep).startswith("list [[")  # no RecursionError on deep values


def test_a_pipeline_of_only_bad_records_stops_with_one_error(monkeypatch):
    monkeypatch.setattr(pack, "MAX_SKIPS_IN_A_ROW", 50)
    ds = grain.MapDataset.range(10).map(lambda i: Skipped("undecodable_image", f"x.jsonl:{i}: broken")).repeat()
    budgets = Budgets(seq_len=64, und_len=48, max_vit_patches=8, max_vae_images=1, vae_hw=(32, 32), vit_patch_dim=12)
    with pytest.raises(
        ValueError,
        match=r"data: 50 records in a row were skipped \(undecodable_image 50\); "
        r"the last: x.jsonl:9: broken",
    ):
        next(iter(PackIterDataset(ds, budgets, batch_rows=1)))
