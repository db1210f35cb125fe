"""What a user reads: the protocol tree, help texts, the GPU row, summaries, the training
viewer's table and the run log's start."""
import configparser
import csv
import json
import re
from pathlib import Path

import torch
from pyworkflow.utils import parseHyperText

import continuousflex_dl
from continuousflex_dl import convert, protocols, reports
from continuousflex_dl.core.network.training import ModelFolder, TrainConfig, best_epoch
from continuousflex_dl.tests.base import EXPECTED_PROTOCOLS
from continuousflex_dl.viewers.viewer_nma import mode_table

#: What a help text must not say: code names, commands, documents and options the form lacks.
DEVELOPER_WORDS = ("core.", "PRESETS", "python -m", "README", "the benchmark", "the paper",
                   "Use queue for steps", "Parallelization", "Compute device")


def _tree():
    conf = configparser.ConfigParser()
    conf.optionxform = str
    conf.read(Path(continuousflex_dl.__file__).with_name("protocols.conf"))
    return json.loads(conf["PROTOCOLS"]["Protocols SPA"])


def test_protocol_tree_has_the_plugin_as_group_and_short_labels():
    """Scipion shows a 'default' text as 'continuousflex_dl - <label>', which its tree pane cuts
    to 'continuousflex_c': the group names the plugin, each protocol its own short label."""
    (section,) = _tree()
    (group,) = section["children"]
    assert group["text"] == "continuousflex_dl"
    entries = {c["value"]: c["text"] for c in group["children"]}
    assert set(entries) == EXPECTED_PROTOCOLS
    for name, text in entries.items():
        assert text == getattr(protocols, name)._label, (name, text)  # one home: the class's _label
        assert len(text) <= 22, text
    assert len(set(entries.values())) == len(entries)


def test_help_speaks_to_users():
    for name in EXPECTED_PROTOCOLS:
        prot = getattr(protocols, name)()
        texts = {f"{name} (class help)": prot.__doc__ or ""}
        for pname, param in prot._definition.iterParams():
            texts[f"{name}.{pname}"] = (param.help.get() or "") + " " + (param.label.get() or "")
        for where, text in texts.items():
            for word in DEVELOPER_WORDS:
                assert word not in text, f"{where} says {word!r}: {text}"
    label = protocols.FlexDLProtAlign()._definition.getParam("amplitudeRange").label.get()
    assert label == "Amplitude range (Å, 0 = automatic)"


def test_gpu_row_is_scipions_and_maps_to_the_device(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    prot = protocols.FlexDLProtAlign()
    names = {n for n, _ in prot._definition.iterParams()}
    assert {"useGpu", "gpuList"} <= names and "device" not in names
    assert prot.allowsGpu() and prot.gpuList.get() == "0" and prot.useGpu.get()
    prot.gpuList.set("2 3")
    assert [prot._gpuSlot(i) for i in range(3)] == [2, 3, 2]  # chunks take the listed GPUs in turn
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert prot._getDevice() == "cuda:2" and prot._usesGPU()
    assert prot._gpuEnv()["CUDA_VISIBLE_DEVICES"] == "2,3"
    prot.gpuList.set("1 1")
    assert prot._gpuEnv()["CUDA_VISIBLE_DEVICES"] == "1"
    prot.useGpu.set(False)  # 'Use GPU?' No: the CPU, and steps do not wait for a GPU
    assert prot._deviceChoice() == "cpu" and prot._getDevice() == "cpu" and not prot._usesGPU()
    assert prot._gpuEnv() is None
    prot.useGpu.set(True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert prot._getDevice() == "cpu" and not prot._usesGPU()  # no CUDA GPU: the CPU


def test_parallel_protocols_report_their_chunk_threads():
    """pyworkflow logs 'binary Threads: getBinThreads()' when a run starts; without a binThreads
    parameter that raised AttributeError, logged as 'Cannot get information about MPI/threads'."""
    from continuousflex_dl.core.device import cpu_threads_available
    for cls, threads in ((protocols.FlexDLProtAlign, 3), (protocols.FlexDLProtPredict, 2)):
        prot = cls()
        assert prot.modeParallel() and not hasattr(prot, "binThreads")
        prot.numberOfThreads.set(threads)
        assert prot.getBinThreads() == max(1, cpu_threads_available() // (threads - 1))
    assert protocols.FlexDLProtNMA().getBinThreads() == 1  # serial: Scipion's own rule


def test_attribute_names_survive_scipions_markup():
    found = []

    def record(match, tag):
        found.append((tag, match.group(tag)))
        return match.group(tag)
    text = f"per particle in {reports.literal('_flexdl_zFlexStd')}, in the order of zFlex."
    assert parseHyperText(text, record) == "per particle in _flexdl_zFlexStd, in the order of zFlex."
    assert found == [("fixed", "_flexdl_zFlexStd")]
    found.clear()
    parseHyperText("per particle in _flexdl_zFlexStd, ...", record)  # as written before: italic 'flexdl'
    assert found == [("italic", "flexdl")]
    align = Path(protocols.protocol_align.__file__).read_text()
    assert "{literal(convert.ZFLEX_STD_ATTR)}" in align
    assert not re.search(r"[^(]\{convert\.[A-Z_]+_ATTR\}", align)  # every attribute in a summary: literal()


def test_attribute_labels_name_the_protocols_attributes():
    assert set(reports.ATTRIBUTE_LABELS) == {convert.SCORE_ATTR, convert.RELIABILITY_ATTR,
                                            protocols.protocol_outliers.DISTANCE_ATTR}
    assert "σ" in reports.ATTRIBUTE_LABELS[protocols.protocol_outliers.DISTANCE_ATTR]


def test_mode_table_counts_modes_as_the_summary_does():
    rows = [dict(number=n, eigenvalue=0.0 if n <= 6 else 0.1 * n, collectivity=0.5, score=1.0,
                 enabled=n != 9) for n in range(1, 11)]
    header, table = mode_table(rows)
    used = header.index("Used")
    assert [r[used] for r in table[:6]] == ["–"] * 6 and {r[1] for r in table[:6]} == {"rigid body"}
    # the NMA summary: "n of K non-rigid modes enabled" counts modes 7-10 only
    assert sum(r[used] == "yes" for r in table) == sum(r["enabled"] for r in rows if r["number"] > 6) == 3
    assert "Eigenvalue (× spring constant)" in header and "Collectivity (0-1)" in header


# ----------------------------------------------------------------------------- training

SIM, FT, KEPT = 30, 10, 23


def _metrics(with_phase: bool = True):
    """A demo-like run: the validation MAE falls to 34.1 Å at epoch 23 of the simulated
    training, then fine-tuning on HEMNMA amplitudes makes it worse (at best 41.0 Å)."""
    rows = []
    for e in range(1, SIM + FT + 1):
        mae = 34.1 + 0.3 * abs(e - KEPT) if e <= SIM else 41.0 + 0.2 * (e - SIM - 1)
        rows.append(dict(epoch=e, phase="simulated" if e <= SIM else "particles", train_loss=1.0 / e,
                         val_loss=mae / 100, val_mae=mae, lr=2e-3 if e <= SIM else 2e-4,
                         images_per_s=123.456789, seconds=10.123456789))
    if not with_phase:
        for r in rows:
            del r["phase"]
    return rows


def _model_dir(folder: Path, rows) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = ModelFolder(folder)
    model.write_config(TrainConfig.build(
        modes=[7, 8, 9], source="simulated+finetune", epochs=SIM, finetune_epochs=FT,
        simulation={"snr": 0.1, "max_shift_px": 1.0, "amplitude_bandwidth": [20.0, 20.0, 20.0]}))
    with open(model.metrics, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: repr(v) if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return folder


def test_training_summary_says_fine_tuning_did_not_help(tmp_path):
    prot = protocols.FlexDLProtTrain()
    prot.workingDir.set(str(tmp_path))
    _model_dir(Path(prot._modelDir()), _metrics())
    summary = prot._summary()
    assert summary[0] == ("40 epochs: simulated training (epochs 1-30), then fine-tuning on the particles' "
                          "amplitudes (epochs 31-40).")
    assert summary[1].startswith("The model keeps the weights of epoch 23 of the simulated training "
                                 "(lowest validation loss): validation MAE 34.1 Å")
    assert summary[2] == ("Fine-tuning on the particles' amplitudes did not improve the validation error "
                          "(34.1 -> 41.0 Å at best); the weights kept are those of epoch 23 of the "
                          "simulated training.")
    assert summary[3].startswith("Training data: simulated, then fine-tuned on the particles (")
    assert prot.phases(prot.metrics()) == ["simulated"] * SIM + ["fine-tuning"] * FT


def test_training_summary_when_fine_tuning_helped(tmp_path):
    rows = _metrics()
    for r in rows[SIM:]:
        r["val_mae"] = 20.0 + 0.1 * (SIM + FT - r["epoch"])
        r["val_loss"] = r["val_mae"] / 100
    model = _model_dir(tmp_path / "model", rows)
    read = list(csv.DictReader(open(ModelFolder(model).metrics)))
    lines = reports.training_summary_lines(read, reports.training_phases(read, "simulated+finetune", SIM),
                                           best_epoch(model)["epoch"])
    assert lines[2] == ("Fine-tuning on the particles' amplitudes lowered the validation error (34.1 -> 20.0 Å); "
                        "the weights kept are those of epoch 40 of the fine-tuning.")


def test_phases_of_a_metrics_file_without_a_phase_column(tmp_path):
    model = _model_dir(tmp_path / "model", _metrics(with_phase=False))
    read = list(csv.DictReader(open(ModelFolder(model).metrics)))
    assert reports.training_phases(read, "simulated+finetune", SIM) == ["simulated"] * SIM + ["fine-tuning"] * FT
    assert reports.training_phases(read[:3], "particles", 3) == ["particles"] * 3
    assert best_epoch(model)["source"] == "simulated"


def test_metrics_table_has_units_phases_and_few_digits(tmp_path):
    model = _model_dir(tmp_path / "model", _metrics())
    read = list(csv.DictReader(open(ModelFolder(model).metrics)))
    assert read[0]["images_per_s"] == "123.456789"  # the file keeps every digit
    header, table = reports.metrics_table(read, reports.training_phases(read, "simulated+finetune", SIM))
    assert header == ["Epoch", "Phase", "Training loss", "Validation loss", "Validation MAE (Å)",
                      "Learning rate", "Images/s", "Time (s)"]
    assert table[KEPT - 1] == ["23", "simulated", "0.04348", "0.341", "34.10", "2.00e-03", "123", "10.1"]
    assert table[-1][1] == "fine-tuning"
    assert max(len(cell) for row in table for cell in row) <= 11


def test_network_warning_when_much_worse_than_hemnma():
    (line,) = reports.network_warning(40.6, 2.4, "DeepHEMNMA's error against the ground truth")
    assert "DeepHEMNMA's error against the ground truth (40.6 Å) is 17x HEMNMA's" in line
    assert "(2.4 Å)" in line
    assert reports.network_warning(7.0, 2.4, "x") == []  # 2.9x: not much worse
    assert reports.network_warning(None, 2.4, "x") == reports.network_warning(40.6, None, "x") == []

