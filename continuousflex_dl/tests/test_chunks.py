"""Chunk plans, fingerprints and chunk files (core/chunks.py)."""
import numpy as np
import pytest

from continuousflex_dl.core.chunks import (auto_chunk_size, chunk_bounds, fingerprint, gather_by_id, read_chunk,
                                           write_chunk)


def test_fingerprint_sees_every_difference_and_ignores_dict_order():
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    base = fingerprint({"modes": [7, 8, 9], "range": 200.0}, a)
    assert len(base) == 64
    assert fingerprint({"range": 200.0, "modes": [7, 8, 9]}, a.copy()) == base
    changed = [fingerprint({"modes": [7, 8], "range": 200.0}, a),
               fingerprint({"modes": [7, 8, 9], "range": 200.0 + 1e-12}, a),
               fingerprint({"modes": [7, 8, 9], "range": 200.0}, a.astype(np.float64)),
               fingerprint({"modes": [7, 8, 9], "range": 200.0}, a.reshape(3, 2)),
               fingerprint({"modes": [7, 8, 9], "range": 200}, a),
               fingerprint({"modes": [7, 8, 9], "range": 200.0}, a, None)]
    assert len({base, *changed}) == 1 + len(changed)
    # Strings and lists of strings do not run together.
    assert fingerprint(["ab", "c"]) != fingerprint(["a", "bc"])
    with pytest.raises(ValueError, match="Cannot fingerprint"):
        fingerprint(object())


def test_chunk_bounds_cover_the_rows_once():
    assert chunk_bounds(60, 20) == [(0, 20), (20, 40), (40, 60)]
    assert chunk_bounds(61, 20)[-1] == (60, 61)
    assert chunk_bounds(5, 100) == [(0, 5)]
    assert chunk_bounds(0, 10) == []
    with pytest.raises(ValueError, match="at least 1"):
        chunk_bounds(10, 0)


def test_chunk_file_is_reused_only_with_the_same_provenance(tmp_path):
    path = tmp_path / "c.npz"
    prov = {"job": "abc", "start": 0, "stop": 3, "modes": [7, 8]}
    amps = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    write_chunk(path, prov, np.array([11, 12, 13]), {"amplitudes": amps})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.npz"]  # no temporary file left
    chunk = read_chunk(path, dict(prov))
    np.testing.assert_array_equal(chunk.ids, [11, 12, 13])
    np.testing.assert_array_equal(chunk.arrays["amplitudes"], amps)
    assert chunk.provenance == prov
    assert read_chunk(path, {**prov, "modes": [7, 8, 9]}) is None
    assert read_chunk(path, {**prov, "stop": 4}) is None
    assert read_chunk(tmp_path / "missing.npz", prov) is None
    path.write_bytes(path.read_bytes()[:40])  # truncated by a kill: ignored, not an error
    assert read_chunk(path, prov) is None
    with pytest.raises(ValueError, match="2 rows for 3"):
        write_chunk(path, prov, np.array([1, 2, 3]), {"score": np.zeros(2)})


def test_gather_places_rows_by_particle_id():
    ids = np.array([5, 9, 2, 7])
    pieces = [(np.array([7, 2]), {"q": np.array([[70.0], [20.0]])}),
              (np.array([9, 5]), {"q": np.array([[90.0], [50.0]])})]
    out = gather_by_id(ids, pieces)
    np.testing.assert_array_equal(out["q"][:, 0], [50.0, 90.0, 20.0, 70.0])
    with pytest.raises(ValueError, match=r"1 particles have no result \(ids \[9\]\)"):
        gather_by_id(ids, [pieces[0], (np.array([5]), {"q": np.array([[50.0]])})])
    with pytest.raises(ValueError, match="two chunk results"):
        gather_by_id(ids, pieces + [pieces[0]])
    with pytest.raises(ValueError, match="id 4, which is not in the input set"):
        gather_by_id(ids, pieces + [(np.array([4]), {"q": np.array([[0.0]])})])


def test_auto_chunk_size_gives_every_worker_work_in_bounded_chunks():
    assert auto_chunk_size(16, 2) == 8  # a small set: one chunk per worker
    assert auto_chunk_size(100, 2) == 20  # 5 chunks of 20, not one of 100
    assert auto_chunk_size(2000, 2) == 250  # about 4 per worker
    assert auto_chunk_size(500_000, 20) == 500  # at most 500
    for n in range(1, 300, 7):
        for workers in range(1, 9):
            size = auto_chunk_size(n, workers)
            chunks = len(chunk_bounds(n, size))
            assert chunks >= min(n, workers), (n, workers, size)
            assert size <= 500 and (size >= 20 or chunks >= min(n, workers))
    with pytest.raises(ValueError, match="at least 1"):
        auto_chunk_size(10, 0)


def test_alignment_chunks_are_large_enough_to_pay_for_their_process():
    from continuousflex_dl.core.hemnma.alignment_job import ALIGN_CHUNK_SMALLEST, alignment_chunk_size
    assert alignment_chunk_size(2000, 2) == 300     # 4 per worker would be 250: too small
    assert alignment_chunk_size(400, 2) == 200      # one per worker, not 8 of 50
    assert alignment_chunk_size(100, 2) == 50       # a small set: still every worker busy
    assert alignment_chunk_size(500_000, 320) == 391
    for n in range(1, 3000, 37):
        for workers in (1, 2, 3, 8, 32):
            size = alignment_chunk_size(n, workers)
            chunks = len(chunk_bounds(n, size))
            assert chunks >= min(n, workers), (n, workers, size)
            # smaller than ALIGN_CHUNK_SMALLEST only when that is one share per worker
            assert size <= 500 and (size >= ALIGN_CHUNK_SMALLEST or size == max(1, n // workers)), (n, workers, size)
