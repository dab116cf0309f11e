"""The subset draw is uniform and order-independent; the top-k heap equals a brute-force sort."""

from __future__ import annotations

import random

import numpy as np
import pytest

from rded.heap import PerClassTopK, Rows, RowTopK, TopK
from rded.keyed import keyed_uniform
from rded.records import PatchRows, SampleRef, ScoredPatch, best_first, draw_order
from rded.select import SubsetDraw

# chi-square critical value, 19 degrees of freedom, p = 0.001
CHI2_19_P001 = 43.82


def refs(n: int, label: int = 0, prefix: str = "k") -> list[SampleRef]:
    return [SampleRef(f"{prefix}{i:04d}", label, i % 3, 1000 * i, 10) for i in range(n)]


def draw(seed: int, samples: list[SampleRef], k: int) -> dict:
    d = SubsetDraw(seed, k)
    not_drawn = []
    for r in samples:
        not_drawn += d.offer(r)
    kept, dropped = d.finish()
    return {c: {r.key for r in v} for c, v in kept.items()}, not_drawn + dropped


def chi2_inclusion(counts: np.ndarray, expected: float) -> float:
    return float(((counts - expected) ** 2 / expected).sum())


def test_draw_is_uniform_over_samples():
    samples = refs(20)
    seeds = 2000
    counts = np.zeros(20)
    for seed in range(seeds):
        chosen, _ = draw(seed, samples, 5)
        for key in chosen[0]:
            counts[int(key[1:])] += 1
    assert counts.sum() == seeds * 5
    assert chi2_inclusion(counts, seeds * 5 / 20) < CHI2_19_P001


def test_uniformity_check_detects_a_biased_draw():
    # the same statistic on a draw that favours low keys must fail, or the test above proves nothing
    rng = random.Random(0)
    counts = np.zeros(20)
    for _ in range(2000):
        pool = list(range(20))
        weights = [1.0 + 0.05 * (19 - i) for i in pool]
        chosen = set()
        while len(chosen) < 5:
            chosen.add(rng.choices(pool, weights)[0])
        for i in chosen:
            counts[i] += 1
    assert chi2_inclusion(counts, 2000 * 5 / 20) > CHI2_19_P001


def test_draw_pairs_are_uniform():
    # every pair of samples is drawn together equally often (uniform over subsets, not just margins)
    samples = refs(8)
    seeds = 3000
    pair_counts = np.zeros((8, 8))
    for seed in range(seeds):
        chosen = sorted(int(k[1:]) for k in draw(seed, samples, 3)[0][0])
        for a in chosen:
            for b in chosen:
                if a < b:
                    pair_counts[a, b] += 1
    pairs = pair_counts[np.triu_indices(8, 1)]
    expected = seeds * 3 / 28  # C(3,2) pairs per draw, 28 possible pairs
    # 27 degrees of freedom, p = 0.001
    assert chi2_inclusion(pairs, expected) < 55.48


def test_draw_is_order_independent_and_brute_force_exact():
    samples = refs(50, 0) + refs(30, 1, prefix="j")
    reference, _ = draw(7, samples, 12)
    for trial in range(5):
        shuffled = samples[:]
        random.Random(trial).shuffle(shuffled)
        assert draw(7, shuffled, 12)[0] == reference
    for c in (0, 1):
        members = [r for r in samples if r.label == c]
        brute = {r.key for r in sorted(members, key=lambda r: draw_order(7, r))[:12]}
        assert reference[c] == brute


def test_every_sample_is_drawn_or_reported_not_drawn_once():
    samples = refs(100)
    chosen, not_drawn = draw(3, samples, 10)
    keys = [r.key for r in not_drawn] + sorted(chosen[0])
    assert sorted(keys) == sorted(r.key for r in samples)


def test_class_with_fewer_samples_than_subset_keeps_all():
    chosen, not_drawn = draw(0, refs(4), 10)
    assert len(chosen[0]) == 4 and not not_drawn


@pytest.mark.parametrize("slack", [None, 1, 3])
@pytest.mark.parametrize("n,k", [(0, 1), (1, 1), (5, 10), (100, 7), (1000, 64), (257, 128)])
def test_topk_equals_brute_force_sort(n, k, slack):
    rng = random.Random(n * 31 + k)
    # few distinct scores, so ties are common and the key must break them
    items = [(round(rng.uniform(-3, 0), 1), f"key{rng.randrange(10**6):06d}-{i}") for i in range(n)]
    top = TopK(k, order=lambda t: (-t[0], t[1]), slack=slack)
    dropped = []
    for it in items:
        dropped += top.push(it)
    kept, last = top.finish()
    dropped += last
    brute = sorted(items, key=lambda t: (-t[0], t[1]))
    assert kept == brute[:k]
    assert sorted(dropped + kept) == sorted(items)


def patch(score: float, key: str, label: int) -> ScoredPatch:
    return ScoredPatch(score, key, label, 0, 0, 1, 0, (0, 0, 1, 1), (1, 1))


def test_per_class_topk_and_exact_merge_of_parts():
    rng = random.Random(5)
    items = [patch(round(rng.uniform(-2, 0), 2), f"s{i:05d}", rng.randrange(4)) for i in range(3000)]
    whole = PerClassTopK(40, best_first, lambda p: p.label)
    whole.push_all(items)
    expected, _ = whole.finish()
    for c in range(4):
        assert expected[c] == sorted((p for p in items if p.label == c), key=best_first)[:40]
    # split across 3 "ranks", then merge their heaps: the same result
    parts = [items[i::3] for i in range(3)]
    merged = PerClassTopK(40, best_first, lambda p: p.label)
    for part in parts:
        h = PerClassTopK(40, best_first, lambda p: p.label)
        h.push_all(part)
        kept, _ = h.finish()
        for v in kept.values():
            merged.push_all(v)
    assert merged.finish()[0] == expected


@pytest.mark.parametrize("slack", [1, 5, 32, 500])
@pytest.mark.parametrize("n,k", [(0, 1), (1, 1), (40, 100), (300, 7), (1000, 64)])
def test_row_topk_keeps_what_the_object_topk_keeps(n, k, slack):
    """Rows sort as the objects do: ties on the score broken by key, non-ASCII and undecodable (surrogate-
    escaped) tar names, offsets past 2**32; items come back equal."""
    rng = random.Random(n * 7 + k + slack)
    names = ["k{}", "é{}", "\udc80{}", "日本{}", "K{}"]
    items = [ScoredPatch(round(rng.uniform(-3, 0), 1), rng.choice(names).format(rng.randrange(50)) + f"-{i}",
                         0, i % 5, 2**40 + 1000 * i, 10 + i, i % 5, (i, 2, 300, 400), (640 + i, 480))
             for i in range(n)]
    objects, rows = TopK(k, best_first), RowTopK(k, best_first, PatchRows, slack)
    dropped_objects, dropped_rows = [], []
    for item in items:
        dropped_objects += objects.push(item)
        dropped_rows += rows.push(item)
    kept_objects, last_objects = objects.finish()
    kept_rows, last_rows = rows.finish()
    assert isinstance(kept_rows, Rows) and list(kept_rows) == kept_objects == sorted(items, key=best_first)[:k]
    assert sorted(dropped_rows + last_rows, key=best_first) == sorted(dropped_objects + last_objects, key=best_first)
    assert kept_rows[1:3] == kept_objects[1:3]


def test_subset_draw_as_rows_equals_brute_force():
    samples = [SampleRef(f"s{i:05d}", i % 3, i % 4, 2**33 + i, i) for i in range(2000)]
    for seed in range(3):
        chosen, not_drawn = draw(seed, samples, 50)
        for c in range(3):
            mine = [r for r in samples if r.label == c]
            assert chosen[c] == {r.key for r in sorted(mine, key=lambda r: draw_order(seed, r))[:50]}
        assert len(not_drawn) == 2000 - 150
    kept, _ = SubsetDraw(0, 5).finish()
    assert kept == {}


def test_rows_of_different_orders_do_not_mix():
    by_score = Rows.of(PatchRows, [patch(-1.0, "a", 0)], best_first)
    by_draw = Rows.of(PatchRows, [patch(-1.0, "b", 0)], lambda p: draw_order(0, p))
    with pytest.raises(ValueError, match="different number types"):
        by_score.concat(by_draw)


def test_keyed_uniform_is_pure_and_spread():
    assert keyed_uniform(1, "a", 2) == keyed_uniform(1, "a", 2)
    assert keyed_uniform(1, "a", 2) != keyed_uniform(2, "a", 2)
    u = np.array([keyed_uniform(0, "t", i) for i in range(5000)])
    hist, _ = np.histogram(u, bins=10, range=(0, 1))
    assert chi2_inclusion(hist, 500) < 27.88  # 9 dof, p = 0.001


def test_first_occurrence_matches_a_plain_set_across_shards():
    """The compact sorted-array form decides like the obvious set of seen keys, with and without the
    torchrun table of other shards' keys."""
    from rded.source import FirstOccurrence, key_hash

    rng = random.Random(5)
    shards = [[f"k{rng.randrange(400)}" for _ in range(rng.randrange(0, 120))] for _ in range(12)]
    seen: set[str] = set()
    expected = []
    for keys in shards:
        expected.append([k not in seen and not seen.add(k) for k in keys])
    mine = {p for p in range(12) if p % 3 == 1}  # under torchrun this rank reads these shards
    table = {p: np.array(sorted({key_hash(k) for k in shards[p]}), np.uint64) for p in range(12) if p not in mine}
    for first, positions in ((FirstOccurrence(), range(12)), (FirstOccurrence(table), sorted(mine))):
        for p in positions:
            first.next_shard(p)
            assert [first.is_first(k) for k in shards[p]] == expected[p], p
