"""Chunk plans, fingerprints and chunk files (core/chunks.py), and the chunk commands' failures (cli.py)."""
import errno

import numpy as np
import pytest

from continuousflex_dl import cli
from continuousflex_dl.core import chunks
from continuousflex_dl.core.chunks import (DiskFullError, auto_chunk_size, chunk_bounds, chunk_error_path, chunk_path,
                                           chunk_problem, fingerprint, gather_by_id, read_chunk, read_chunk_error,
                                           save_job_files, write_chunk)


def _fill_then_fail(*file, **arrays):
    """np.savez on a full disk: part of the file is written, then ENOSPC."""
    with open(file[0], "wb") as f:
        f.write(b"PK\x03\x04" + b"\0" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


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


def test_a_full_disk_names_the_folder_and_the_space_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setattr(chunks.np, "savez", _fill_then_fail)
    amps = np.zeros((250_000, 4))  # 8 MB, ids 2 MB
    with pytest.raises(DiskFullError) as caught:
        write_chunk(tmp_path / "c.npz", {"job": "abc"}, np.arange(250_000), {"amplitudes": amps})
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert message.startswith(f"No space left on the disk of {tmp_path}: writing a file of about 10.0 MB failed (")
    assert " free). Free some space there, then Continue the run." in message and "Errno" not in message
    assert list(tmp_path.iterdir()) == []  # no rows_....npz.tmp<pid>.npz left
    with pytest.raises(DiskFullError, match="No space left on the disk of"):
        save_job_files(tmp_path / "job", {"x": np.zeros(3)}, {"a": 1})
    assert sorted(p.name for p in (tmp_path / "job").iterdir()) == ["chunks"]
    # Other failures are not disguised as a full disk, and leave no temporary file either.
    monkeypatch.setattr(chunks.np, "savez", lambda *file, **a: (open(file[0], "wb").write(b"x"), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        write_chunk(tmp_path / "c.npz", {"job": "abc"}, np.arange(2), {"q": np.zeros(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job"]


def test_chunk_problem_says_why_a_chunk_file_is_not_a_result(tmp_path):
    (tmp_path / "chunks").mkdir()
    assert chunk_problem(tmp_path, 0, 3, "abc") == "missing"
    path = chunk_path(tmp_path, 0, 3)
    write_chunk(path, {"job": "abc", "start": 0, "stop": 3}, np.arange(3), {"q": np.arange(3.0)})
    assert chunk_problem(tmp_path, 0, 3, "abc") is None
    assert chunk_problem(tmp_path, 0, 3, "xyz") == "computed for other inputs or settings"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    assert chunk_problem(tmp_path, 0, 3, "abc").startswith("damaged (")
    # A flipped byte inside an array (zip CRC) is damage too, not a result.
    write_chunk(path, {"job": "abc", "start": 0, "stop": 3}, np.arange(3), {"q": np.full(3, 7.0)})
    data = bytearray(path.read_bytes())
    at = bytes(data).index(np.full(3, 7.0).tobytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    assert chunk_problem(tmp_path, 0, 3, "abc").startswith("damaged (")


def _chunk_command(tmp_path, run_chunk, capsys):
    """Run the chunk command line in this process on rows 0-3 of ``tmp_path``: (exit status, stderr)."""
    (tmp_path / "chunks").mkdir(exist_ok=True)
    status = cli._chunk_main([str(tmp_path), "--rows", "0", "3", "--threads", "1"], "align-chunk", "Test",
                             run_chunk)
    return status, capsys.readouterr().err


def test_a_chunk_command_leaves_its_reason_in_a_file(tmp_path, capsys, monkeypatch):
    def refuse(folder, start, stop, fp, device, progress):
        raise ValueError("Particles with ids [2] contain NaN or infinite pixels: remove them.")

    status, err = _chunk_command(tmp_path, refuse, capsys)
    assert status == 1
    expected = "align-chunk rows 0-3: Particles with ids [2] contain NaN or infinite pixels: remove them."
    assert read_chunk_error(tmp_path, 0, 3) == expected
    assert expected in err and "Traceback" not in err

    def full_disk(folder, start, stop, fp, device, progress):
        write_chunk(chunk_path(folder, start, stop), {"job": "abc"}, np.arange(3), {"q": np.zeros(3)})

    monkeypatch.setattr(chunks.np, "savez", _fill_then_fail)
    status, err = _chunk_command(tmp_path, full_disk, capsys)
    assert status == 1
    assert read_chunk_error(tmp_path, 0, 3).startswith(f"align-chunk rows 0-3: No space left on the disk of "
                                                      f"{tmp_path / 'chunks'}: writing ")
    assert "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "chunks").iterdir()) == [chunk_error_path(tmp_path, 0, 3).name]

    def bug(folder, start, stop, fp, device, progress):
        return {}["missing"]

    status, err = _chunk_command(tmp_path, bug, capsys)
    assert status == 1
    assert read_chunk_error(tmp_path, 0, 3) == ("align-chunk rows 0-3 failed: KeyError: 'missing' (the traceback "
                                                "is in the log of the step or of its cluster job)")
    assert "Traceback" in err  # for whoever debugs it

    def fine(folder, start, stop, fp, device, progress):
        return chunk_path(folder, start, stop), True

    status, err = _chunk_command(tmp_path, fine, capsys)
    assert status == 0
    assert read_chunk_error(tmp_path, 0, 3) is None  # the earlier reason is gone with a success


def test_a_job_whose_files_were_edited_is_refused():
    class Job(chunks.ChunkedJob):
        WHAT = "toy job"

        def __init__(self, value):
            self.value = value

        def fingerprint(self):
            return fingerprint(self.value)

    job = Job(1)
    assert job.verified("folder", fingerprint(1)) is job
    with pytest.raises(ValueError, match=r"The toy job in folder does not match its recorded fingerprint "
                                         r"\(damaged or edited\): run the protocol's conversion step again"):
        job.verified("folder", fingerprint(2))


def test_alignment_job_keeps_its_blocks_and_deformation_in_files_and_fingerprint(tmp_path):
    """The atoms' residues (the rigid blocks) and the deformation travel with an alignment job's
    files, and a change of either is a different job: a continued run never mixes them."""
    from continuousflex_dl.core.hemnma.alignment_job import AlignmentJob
    from continuousflex_dl.core.modes.reference import Reference
    rng = np.random.default_rng(0)
    coords, modes = rng.normal(size=(12, 3)), rng.normal(size=(2, 12, 3))
    blocks = np.repeat(np.arange(4), 3)

    def job(blocks=blocks, deformation="rigid-blocks"):
        return AlignmentJob(reference=Reference(coords, modes, blocks=blocks), mode_numbers=[7, 8],
                            ids=np.arange(1, 4), stacks=["s.mrc"] * 3, indices=np.arange(3), pixel_size=2.0,
                            options=dict(deformation=deformation))

    job().save(tmp_path)
    loaded = AlignmentJob.load(tmp_path)
    np.testing.assert_array_equal(loaded.reference.blocks, blocks)
    assert loaded.fingerprint() == job().fingerprint()
    assert len({job().fingerprint(), job(deformation="linear").fingerprint(), job(blocks=None).fingerprint(),
                job(blocks=np.repeat(np.arange(3), 4)).fingerprint()}) == 4
    with pytest.raises(ValueError, match="one label per atom"):
        Reference(coords, modes, blocks=blocks[:5])
