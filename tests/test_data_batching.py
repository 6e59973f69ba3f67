"""Batching: layout, buckets, per-process slices, exact save/restore; ranked sets on disk."""

import os

import numpy as np
import pytest

from pl_dpo.data import (
    BatchIterator,
    RankedBatch,
    RankedSet,
    assemble_ranked,
    concat_ranked_sets,
    load_arrays,
    load_ranked_set,
    prompt_batches,
    save_arrays,
    save_ranked_set,
)


def _arrays(n=23, k=3, seed=0, with_ref=True):
    """Random ranked arrays with varied prompt / response lengths and list sizes."""
    rng = np.random.default_rng(seed)
    prompts = [list(rng.integers(3, 50, size=rng.integers(2, 9))) for _ in range(n)]
    responses = [
        [
            list(rng.integers(3, 50, size=rng.integers(1, 20 if i % 5 else 40))) + [2]
            for _ in range(rng.integers(1, k + 1))
        ]
        for i in range(n)
    ]
    ref = rng.normal(size=(n, k)).astype(np.float32) if with_ref else None
    return assemble_ranked(
        prompts, responses, pad_id=0, k=k, seq_len=64, prompt_len=8, example_ids=np.arange(100, 100 + n), ref_logps=ref
    )


def _fields(b: RankedBatch):
    return {f: getattr(b, f) for f in RankedBatch.__dataclass_fields__}


def test_batch_layout_and_buckets():
    arrays = _arrays()
    it = BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, seed=1, length_buckets=(16, 32, 64))
    for _ in range(it.steps_per_epoch):
        b = next(it)
        l = b.tokens_BxKxL.shape[-1]
        assert l in (16, 32, 64) and b.tokens_BxKxL.dtype == np.int32
        lens = b.attn_valid_BxKxL.sum(-1).max()
        assert lens <= l and (l == 16 or lens > {32: 16, 64: 32}[l])  # Smallest bucket that fits.
        rows = b.example_ids_B - 100
        np.testing.assert_array_equal(b.tokens_BxKxL, arrays.tokens_NxKxL[rows, :, :l])
        np.testing.assert_array_equal(b.loss_mask_BxKxL, arrays.loss_mask_NxKxL[rows, :, :l])
        np.testing.assert_array_equal(b.valid_BxK, arrays.valid_NxK[rows])
        assert b.positions_BxKxL[1, 2].tolist() == list(range(l))
        assert (b.ref_logps_BxK[b.valid_BxK] == arrays.ref_logps_NxK[rows][b.valid_BxK]).all()
        assert not b.loss_mask_BxKxL[..., 0].any()
    with pytest.raises(StopIteration):
        BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, num_epochs=0).__next__()


def test_epochs_cover_everything_once_with_padding_rows():
    arrays = _arrays(n=10, with_ref=False)
    it = BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, seed=2, drop_remainder=False, num_epochs=2)
    assert it.steps_per_epoch == 3
    batches = list(it)
    assert len(batches) == 6
    for epoch in (batches[:3], batches[3:]):
        ids = np.concatenate([b.example_ids_B for b in epoch])
        assert sorted(ids[ids >= 0].tolist()) == list(range(100, 110)) and (ids == -1).sum() == 2
    last = batches[2]
    pad = last.example_ids_B == -1
    assert not last.valid_BxK[pad].any() and not last.loss_mask_BxKxL[pad].any()
    assert last.attn_valid_BxKxL[pad].any(-1).all()  # Padding rows still attend to something.
    assert last.ref_logps_BxK is None
    # Shuffling differs between epochs but is fixed by the seed.
    e0 = [b.example_ids_B.tolist() for b in batches[:3]]
    assert e0 != [b.example_ids_B.tolist() for b in batches[3:]]
    assert e0 == [
        b.example_ids_B.tolist()
        for b in list(
            BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, seed=2, drop_remainder=False, num_epochs=1)
        )
    ]


@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_disjoint_and_covering(count):
    arrays = _arrays()
    iters = [
        BatchIterator(arrays, batch_size=8, batch_type=RankedBatch, seed=5, process_index=p, process_count=count)
        for p in range(count)
    ]
    ref = BatchIterator(arrays, batch_size=8, batch_type=RankedBatch, seed=5)
    for _ in range(2 * ref.steps_per_epoch):
        g = next(ref)
        parts = [next(i) for i in iters]
        assert {p.tokens_BxKxL.shape for p in parts} == {(8 // count, 3, g.tokens_BxKxL.shape[-1])}  # Same L.
        ids = [p.example_ids_B.tolist() for p in parts]
        flat = sum(ids, [])
        assert len(set(flat)) == len(flat) and flat == g.example_ids_B.tolist()
        np.testing.assert_array_equal(np.concatenate([p.tokens_BxKxL for p in parts]), g.tokens_BxKxL)
    with pytest.raises(ValueError, match="divisible"):
        BatchIterator(arrays, batch_size=6, batch_type=RankedBatch, process_count=4)
    with pytest.raises(ValueError, match="process_index"):
        BatchIterator(arrays, batch_size=8, batch_type=RankedBatch, process_index=4, process_count=4)


def test_state_restore_resumes_exactly_across_epochs():
    arrays = _arrays()
    it = BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, seed=9)  # 5 steps per epoch.
    for _ in range(7):
        next(it)
    state = dict(it.state())
    expected = [next(it) for _ in range(6)]
    fresh = BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, seed=9)
    fresh.restore(state)
    for want in expected:
        got = next(fresh)
        for name, value in _fields(want).items():
            np.testing.assert_array_equal(getattr(got, name), value, err_msg=name)
    assert fresh.state() == it.state()
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(arrays, batch_size=4, batch_type=RankedBatch, seed=8).restore(state)
    with pytest.raises(ValueError, match="num_examples"):
        BatchIterator(_arrays(n=22), batch_size=4, batch_type=RankedBatch, seed=9).restore(state)


def test_prompt_batches_left_padded():
    arrays = _arrays(n=5)
    batches = list(prompt_batches(arrays.prompts(), batch_size=2, length_buckets=(4, 8)))
    assert len(batches) == 3 and batches[-1].example_ids_B.tolist() == [104, -1]
    for b in batches:
        p = b.prompt_tokens_BxP.shape[1]
        assert p in (4, 8) and b.prompt_valid_BxP[:, -1].all()  # Generation continues at the last column.
        for row in range(2):
            n = b.example_ids_B[row] - 100 if b.example_ids_B[row] >= 0 else 4
            real = arrays.prompt_tokens_NxP[n][arrays.prompt_valid_NxP[n]]
            assert b.prompt_tokens_BxP[row][b.prompt_valid_BxP[row]].tolist() == real.tolist()
            assert b.positions_BxP[row][b.prompt_valid_BxP[row]].tolist() == list(range(len(real)))
    halves = [list(prompt_batches(arrays.prompts(), batch_size=2, process_index=i, process_count=2)) for i in range(2)]
    assert [h0.example_ids_B.tolist() + h1.example_ids_B.tolist() for h0, h1 in zip(*halves)] == [
        b.example_ids_B.tolist() for b in batches
    ]


def test_validation_errors():
    arrays = _arrays(n=4).arrays()
    bad = dict(arrays, loss_mask_NxKxL=arrays["loss_mask_NxKxL"].copy())
    bad["loss_mask_NxKxL"][0, 0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        RankedSet.from_arrays(bad)
    bad = dict(arrays, loss_mask_NxKxL=arrays["loss_mask_NxKxL"] | True)
    with pytest.raises(ValueError, match="position 0|padding"):
        RankedSet.from_arrays(bad)
    with pytest.raises(ValueError, match="lack"):
        RankedSet.from_arrays({k: v for k, v in arrays.items() if k != "valid_NxK"})
    with pytest.raises(ValueError, match="unknown arrays \\['scores'\\]"):
        RankedSet.from_arrays(dict(arrays, scores=arrays["valid_NxK"]))
    with pytest.raises(ValueError, match="valid_NxK has shape"):
        RankedSet.from_arrays(dict(arrays, valid_NxK=arrays["valid_NxK"][:, :2]))
    ref = arrays["ref_logps_NxK"].copy()
    ref[0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        RankedSet.from_arrays(dict(arrays, ref_logps_NxK=ref))
    with pytest.raises(ValueError, match="< batch_size"):
        BatchIterator(RankedSet.from_arrays(arrays), batch_size=8, batch_type=RankedBatch)
    with pytest.raises(TypeError, match="takes a RankedSet"):
        BatchIterator(arrays, batch_size=2, batch_type=RankedBatch)


def test_ranked_set_roundtrip_atomic_no_pickle(tmp_path):
    ranked = _arrays(n=6)
    path = tmp_path / "round_3" / "ranked.npz"
    save_ranked_set(path, ranked)
    back = load_ranked_set(path)
    assert sorted(back.arrays()) == sorted(ranked.arrays())
    for k, v in ranked.arrays().items():
        assert getattr(back, k).dtype == v.dtype
        np.testing.assert_array_equal(getattr(back, k), v)
    assert os.listdir(path.parent) == ["ranked.npz"]  # No temporary file left behind.
    # The loaded set batches exactly like the in-memory one.
    a = next(BatchIterator(ranked, batch_size=2, batch_type=RankedBatch, seed=0))
    b = next(BatchIterator(back, batch_size=2, batch_type=RankedBatch, seed=0))
    np.testing.assert_array_equal(a.tokens_BxKxL, b.tokens_BxKxL)
    # Overwrite is all-or-nothing: a failed write leaves the old file intact.
    with pytest.raises(ValueError, match="dtype object"):
        save_arrays(path, {"tokens_NxKxL": np.array([{"x": 1}], dtype=object)})
    assert sorted(load_ranked_set(path).arrays()) == sorted(ranked.arrays())
    # A file holding pickled objects is refused on load.
    evil = tmp_path / "evil.npz"
    np.savez(evil, obj=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ValueError, match="pickle"):
        load_arrays(evil)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_ranked_set(tmp_path / "nope.npz")


def test_concat_ranked_sets_joins_common_arrays_in_order():
    a, b = _arrays(n=5, seed=1), _arrays(n=7, seed=2)
    b = b.replace(policy_sample_correct_N=np.ones(7, bool))  # only in one set: left out
    both = concat_ranked_sets([a, b])
    assert sorted(both.arrays()) == sorted(a.arrays())
    for k, v in a.arrays().items():
        np.testing.assert_array_equal(getattr(both, k)[:5], v)
        np.testing.assert_array_equal(getattr(both, k)[5:], getattr(b, k))
    assert both.num_lists == 12
    with pytest.raises(ValueError, match="different layouts"):
        concat_ranked_sets([a, _arrays(n=5, k=2)])
